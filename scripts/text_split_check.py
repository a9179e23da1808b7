"""Outside-in check of `cargo xtask data --sample-by paragraph|line` against Hugging Face `datasets`'
text loader (`load_dataset("text", sample_by=...)`) on the same plain text files: the documents in
the shards (read with pyarrow, decoded with Python `tokenizers`, BOS/EOS dropped) must be the rows
`datasets` makes, up to the two readers' stated differences in whitespace:
- `datasets` opens files with universal newlines (\r\n becomes \n); patchlm keeps the bytes;
- `datasets` keeps a UTF-8 byte-order mark as U+FEFF at a file's start; patchlm skips it;
- `datasets` splits paragraphs on every "\n\n" and keeps what is left (empty rows, a row's leading
  "\n" after three line breaks, the last row's final "\n"); patchlm drops empty documents and the
  blank lines around paragraphs.
    python3 scripts/text_split_check.py FILE.txt...
Needs datasets, pyarrow, tokenizers; a release build of xtask."""
import collections, glob, json, os, subprocess, sys, tempfile
import pyarrow as pa
from datasets import load_dataset
from tokenizers import Tokenizer

files = sys.argv[1:]
for mode in ["paragraph", "line"]:
    out = tempfile.mkdtemp(prefix=f"split-{mode}-")
    os.rmdir(out)
    subprocess.run(["target/release/xtask", "data", "--input", *files, "--out", out, "--sample-by", mode,
                    "--vocab-size", "1000"], check=True, capture_output=True)
    m = json.load(open(f"{out}/manifest.json"))
    tok = Tokenizer.from_file(f"{out}/tokenizer.json")
    special = {m["special_tokens"]["bos"], m["special_tokens"]["eos"]}
    ours = collections.Counter()
    for shard in m["shards"]:
        for ids in pa.ipc.open_file(f"{out}/{shard['file']}").read_all().column("tokens").to_pylist():
            text = tok.decode([i for i in ids if i not in special], skip_special_tokens=False)
            ours[text.replace("\r\n", "\n")] += 1
    rows = [r.lstrip("\ufeff") for r in load_dataset("text", data_files=files, sample_by=mode, split="train")["text"]]
    if mode == "paragraph":
        rows = [r.strip("\n") for r in rows]
    theirs = collections.Counter(r for r in rows if r.strip())
    same = ours == theirs
    print(f"{mode:>9}: patchlm {sum(ours.values())} documents, datasets {sum(theirs.values())} non-empty rows; "
          f"{'the same' if same else 'DIFFERENT'}")
    if not same:
        print("  only patchlm:", list((ours - theirs).items())[:3])
        print("  only datasets:", list((theirs - ours).items())[:3])
        sys.exit(1)
print("OK")
