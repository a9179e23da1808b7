"""Outside-in check of a model directory written by patchlm: HF transformers loads it with
AutoModelForCausalLM.from_pretrained (no conversion) and its per-token log-probabilities agree with
`cargo xtask score --json` on the same text.
    python3 scripts/hf_check.py runs/pretrain/model "Some text to score."
Needs torch + transformers + tokenizers; a release build of xtask."""
import json, subprocess, sys
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
print("loaded", type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
ids = [model.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids
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
