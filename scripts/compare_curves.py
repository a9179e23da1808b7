"""Does a run track a reference loss curve (e.g. GPU bf16 against CPU f32, same seed, same data)?
    python3 scripts/compare_curves.py REFERENCE.jsonl CANDIDATE.jsonl [--noise OTHER.jsonl] [--tol 0.05]
Compares training loss smoothed over --window steps (single steps differ by batch-level chaos once
two runs' rounding differs) and every validation loss. The bound is --tol nats, or, with --noise
(a run that differs from the reference only by rounding, e.g. the same GPU in f32), 1.5x the
larger of that run's own deviations: "within the noise of changing the arithmetic".
Prints the deviations and TRACKS or DIVERGES; exits 1 on DIVERGES. --measure-only prints the
deviations alone (for the noise run itself, which sets the bound rather than meets one)."""
import argparse, json, sys

ap = argparse.ArgumentParser()
ap.add_argument("reference"); ap.add_argument("candidate")
ap.add_argument("--noise", help="a run whose deviation from the reference sets the bound")
ap.add_argument("--tol", type=float, default=0.05); ap.add_argument("--window", type=int, default=10)
ap.add_argument("--measure-only", action="store_true", help="print the deviations, no verdict")
a = ap.parse_args()

def load(p):
    steps, evals = {}, {}
    for line in open(p):
        r = json.loads(line)
        if r["kind"] == "step":
            steps[r["global_step"]] = r["loss"]
        elif r["kind"] == "eval":
            evals[r["global_step"]] = r["val_loss"]
    return steps, evals

def deviation(ref, cand):
    (rs, re_), (cs, ce) = ref, cand
    common = sorted(set(rs) & set(cs))
    if not common:
        sys.exit("no common steps")
    w = a.window
    smooth = lambda d, i: sum(d[s] for s in common[max(0, i - w + 1): i + 1]) / len(common[max(0, i - w + 1): i + 1])
    d_train = max(abs(smooth(rs, i) - smooth(cs, i)) for i in range(len(common)))
    ev = sorted(set(re_) & set(ce))
    d_val = max((abs(re_[s] - ce[s]) for s in ev), default=0.0)
    last = common[-1]
    return d_train, d_val, len(common), last, rs[last], cs[last], len(ev)

ref = load(a.reference)
d_train, d_val, n, last, r_last, c_last, n_ev = deviation(ref, load(a.candidate))
print(f"steps compared {n} (last {last}); final train loss {r_last:.4f} (reference) vs {c_last:.4f}")
print(f"max |smoothed train loss diff| {d_train:.4f} nats (window {a.window}); "
      f"max |val loss diff| {d_val:.4f} nats over {n_ev} validations")
if a.measure_only:
    print("NOISE FLOOR (deviations only, no verdict)")
    sys.exit(0)
bound = a.tol
if a.noise:
    nt, nv = deviation(ref, load(a.noise))[:2]
    bound = max(a.tol, 1.5 * max(nt, nv))
    print(f"noise run {a.noise}: smoothed train {nt:.4f}, val {nv:.4f} -> bound {bound:.4f}")
else:
    print(f"bound {bound:.4f} (--tol)")
ok = d_train <= bound and d_val <= bound
print("TRACKS" if ok else "DIVERGES")
sys.exit(0 if ok else 1)
