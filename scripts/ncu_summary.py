"""Where a training step's GPU time goes, from Nsight Compute's per-kernel summary:
    ncu --metrics gpu__time_duration.sum --print-summary per-kernel <command> > ncu.txt
    python3 scripts/ncu_summary.py ncu.txt [--steps 3]
Prints total kernel time per kernel name (all launch shapes together), largest first, divided by
--steps (the number of training steps the profiled command ran, warm-up included). Note that ncu
locks the clocks to base, so absolute times run above an unprofiled step's."""
import argparse, re, sys

ap = argparse.ArgumentParser()
ap.add_argument("file"); ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--top", type=int, default=30)
a = ap.parse_args()
text = open(a.file).read()
head = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), .*Invocations (\d+)$", re.M)
metric = re.compile(r"gpu__time_duration\.sum\s+(\S+)\s+\S+\s+\S+\s+(\S+)")
unit = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "nsecond": 1e-3}
per_name, launches = {}, 0
heads = list(head.finditer(text))
for i, h in enumerate(heads):
    end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
    m = metric.search(text, h.end(), end)
    if not m or m.group(1) not in unit:
        continue
    name = re.sub(r"[<(].*", "", h.group(1)).strip()
    calls = int(h.group(8))
    us = calls * float(m.group(2).replace(",", "")) * unit[m.group(1)]
    t, c = per_name.get(name, (0.0, 0))
    per_name[name] = (t + us, c + calls)
    launches += calls
if not per_name:
    sys.exit(f"no per-kernel summary with gpu__time_duration.sum in {a.file}")
total = sum(t for t, _ in per_name.values())
print(f"{total / 1e3 / a.steps:.2f} ms of kernel time per step over {launches // a.steps} launches per step "
      f"({len(per_name)} kernels, {a.steps} steps profiled)")
for name, (t, c) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[: a.top]:
    print(f"{t / 1e3 / a.steps:8.2f} ms {100 * t / total:5.1f}% {c // a.steps:6d} launches  {name}")
