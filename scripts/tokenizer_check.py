"""Outside-in check of the tokenizer `cargo xtask data` trains: Python `tokenizers`' own BpeTrainer
(byte-level pre-tokenizer, the byte alphabet, the same special tokens, vocabulary size and
minimum pair frequency) on the same documents must learn the same vocabulary and merges. As the
data stage does, runs of more than 256 non-whitespace characters reach the trainer cut into
pieces of 256 (`tokenizer::cut_long_runs`; whitespace as Unicode's White_Space property).
    python3 scripts/tokenizer_check.py --tokenizer data/shards-*/tokenizer.json --input data/corpus/corpus.jsonl
The input is JSONL with a `text` field (what `cargo xtask corpus` writes); documents are fed in
file order up to --max-train-bytes, as the data stage feeds them. Needs tokenizers."""
import argparse, json
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--min-frequency", type=int, default=2)
ap.add_argument("--max-train-bytes", type=int, default=256 << 20)
a = ap.parse_args()
ours = json.load(open(a.tokenizer, encoding="utf-8"))
texts, seen = [], 0
for line in open(a.input, encoding="utf-8"):
    if seen >= a.max_train_bytes:
        break
    texts.append(json.loads(line)["text"])
    seen += len(texts[-1].encode())
# Unicode's White_Space characters (Rust's char::is_whitespace; Python's str.isspace also counts
# U+001C..U+001F, which are not).
WHITE = set("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}
MAX_RUN = 256


def cut_long_runs(text):
    pieces, start, run = [], 0, 0
    for i, c in enumerate(text):
        if c in WHITE:
            run = 0
            continue
        if run == MAX_RUN:
            pieces.append(text[start:i])
            start, run = i, 0
        run += 1
    pieces.append(text[start:])
    return pieces


texts = [p for t in texts for p in cut_long_runs(t)]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
specials = [t["content"] for t in sorted(ours["added_tokens"], key=lambda t: t["id"])]
trainer = trainers.BpeTrainer(vocab_size=len(ours["model"]["vocab"]), min_frequency=a.min_frequency,
                              show_progress=False, special_tokens=specials,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(texts, trainer)
py = json.loads(tok.to_str())["model"]
print(f"{len(texts)} pieces of documents, {seen / 1e6:.2f} MB; special tokens {specials}")
print(f"vocabulary: {len(py['vocab'])} (python) vs {len(ours['model']['vocab'])} (patchlm), equal: {py['vocab'] == ours['model']['vocab']}")
print(f"merges: {len(py['merges'])} vs {len(ours['model']['merges'])}, equal: {py['merges'] == ours['model']['merges']}")
assert py["vocab"] == ours["model"]["vocab"] and py["merges"] == ours["model"]["merges"], "the tokenizers differ"
print("OK")
