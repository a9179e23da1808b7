"""Compare two runs' loss curves step by step (e.g. GPU bf16 against CPU f32, same seed):
    python3 scripts/compare_curves.py runs/track-cpu/metrics.jsonl runs/track-gpu/metrics.jsonl [--tol 0.05]
Prints the largest differences of training and validation loss and exits 1 above --tol (nats)."""
import argparse, json, sys

ap = argparse.ArgumentParser()
ap.add_argument("reference"); ap.add_argument("candidate"); ap.add_argument("--tol", type=float, default=0.05)
a = ap.parse_args()

def load(p):
    steps, evals = {}, {}
    for line in open(p):
        r = json.loads(line)
        (steps if r["kind"] == "step" else evals)[r["global_step"]] = r
    return steps, evals

(rs, re_), (cs, ce) = load(a.reference), load(a.candidate)
common = sorted(set(rs) & set(cs))
if not common:
    sys.exit("no common steps")
d_train = max(abs(rs[s]["loss"] - cs[s]["loss"]) for s in common)
ev = sorted(set(re_) & set(ce))
d_val = max((abs(re_[s]["val_loss"] - ce[s]["val_loss"]) for s in ev), default=float("nan"))
last = common[-1]
print(f"steps compared {len(common)} (last {last}); final train loss {rs[last]['loss']:.4f} vs {cs[last]['loss']:.4f}")
print(f"max |train loss diff| {d_train:.4f} nats; max |val loss diff| {d_val:.4f} nats over {len(ev)} validations; tol {a.tol}")
ok = d_train <= a.tol and (d_val != d_val or d_val <= a.tol)
print("TRACKS" if ok else "DIVERGES")
sys.exit(0 if ok else 1)
