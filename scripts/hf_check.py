"""Outside-in check of a model directory written by patchlm: HF transformers loads it with
AutoModelForCausalLM.from_pretrained (no conversion) and its per-token log-probabilities agree with
`cargo xtask score --json` on the same text, and greedy `cargo xtask generate` continues a prompt
as HF generate does.
    python3 scripts/hf_check.py runs/pretrain/model "Some text to score."
Needs torch + transformers + tokenizers; a release build of xtask."""
import json, subprocess, sys
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
print("loaded", type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
# AutoTokenizer reads the directory as written (tokenizer.json + tokenizer_config.json): it must
# frame a text as training framed documents (BOS first) and know the special tokens.
hf_tok = AutoTokenizer.from_pretrained(model_dir)
ids = hf_tok(text).input_ids
assert ids == [model.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids, ids
assert hf_tok.eos_token_id == model.config.eos_token_id, (hf_tok.eos_token, model.config.eos_token_id)
print(f"AutoTokenizer: {type(hf_tok).__name__}, BOS first, bos/eos/pad {hf_tok.bos_token} {hf_tok.eos_token} {hf_tok.pad_token}")
with torch.no_grad():
    lp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]
hf = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
out = subprocess.run(["target/release/xtask", "score", "--model", model_dir, "--text", text, "--json"],
                     capture_output=True, text=True, check=True).stdout
ours = [t["logprob"] for t in json.loads(out)["tokens"]]
diff = max(abs(a - b) for a, b in zip(hf, ours))
print(f"tokens {len(hf)}; HF total NLL {-sum(hf):.5f}; patchlm total NLL {-sum(ours):.5f}; max |diff| per token {diff:.2e}")
assert len(hf) == len(ours) and diff < 1e-3, "mismatch"
print("OK")

# Greedy generation: HF's generate (no sampling) and `cargo xtask generate --temperature 0` must
# continue the prompt with the same text.
prompt = text
pids = hf_tok(prompt).input_ids
with torch.no_grad():
    gen = model.generate(torch.tensor([pids]), attention_mask=torch.ones(1, len(pids), dtype=torch.long),
                         do_sample=False, max_new_tokens=24, eos_token_id=model.config.eos_token_id,
                         pad_token_id=model.config.eos_token_id)[0, len(pids):].tolist()
if gen and gen[-1] == model.config.eos_token_id:
    gen = gen[:-1]
hf_text = prompt + hf_tok.decode(gen, skip_special_tokens=True)
ours_text = subprocess.run(["target/release/xtask", "generate", "--model", model_dir, "--prompt", prompt,
                            "--temperature", "0", "--max-tokens", "24"],
                           capture_output=True, text=True, check=True).stdout.removesuffix("\n")
print(f"greedy, HF:      {hf_text!r}\ngreedy, patchlm: {ours_text!r}")
assert hf_text == ours_text, "greedy generations differ"
print("OK")
