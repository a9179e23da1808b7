"""Data-stage throughput side by side: patchlm (`cargo xtask bench data`) vs the Python
`tokenizers` package's encode_batch on the same tokenizer.json and the same text, same machine.
    python3 bench/compare_data.py --tokenizer T.json --input corpus.jsonl
Needs: pip install tokenizers; a release build of xtask (cargo build --release -p xtask)."""
import argparse, json, os, subprocess, time
import tokenizers

ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--xtask", default="target/release/xtask")
a = ap.parse_args()
texts = [json.loads(l)["text"] for l in open(a.input, encoding="utf-8") if l.strip()]
mb = sum(len(t.encode()) for t in texts) / 1e6
tok = tokenizers.Tokenizer.from_file(a.tokenizer)
runs = []
for _ in range(3):
    t0 = time.perf_counter()
    tok.encode_batch(texts, add_special_tokens=False)
    runs.append(mb / (time.perf_counter() - t0))
py = sorted(runs)[1]
out = subprocess.run([a.xtask, "bench", "data", "--tokenizer", a.tokenizer, "--input", a.input],
                     capture_output=True, text=True, check=True).stdout
rs = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
print(f"text {mb:.2f} MB, {os.cpu_count()} cores, patchlm threads {rs['threads']}")
print(f"{'measure':<44}{'value':>14}{'ratio':>10}")
print(f"{'python tokenizers encode_batch (MB/s)':<44}{py:>14.2f}{1.0:>10.2f}")
print(f"{'patchlm encode, all cores (MB/s)':<44}{rs['encode_mb_per_s']:>14.2f}{rs['encode_mb_per_s'] / py:>10.2f}")
print(f"{'patchlm whole data stage (MB/s)':<44}{rs['stage_mb_per_s']:>14.2f}{rs['stage_mb_per_s'] / py:>10.2f}")
raw = rs["raw_read_tokens_per_s"]
print(f"{'raw sequential read of a shard (tokens/s)':<44}{raw:>14.3e}{1.0:>10.2f}")
print(f"{'reader sequential scan (tokens/s)':<44}{rs['sequential_scan_tokens_per_s']:>14.3e}{rs['sequential_scan_tokens_per_s'] / raw:>10.2f}")
print(f"{'reader random 1024-token windows (tokens/s)':<44}{rs['random_1024_windows_tokens_per_s']:>14.3e}{rs['random_1024_windows_tokens_per_s'] / raw:>10.2f}")
