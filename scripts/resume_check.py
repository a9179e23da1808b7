"""Outside-in check of resuming: `cargo xtask pretrain` is SIGKILLed at random moments (data stage,
patch datasets, training, checkpoint and plot writes alike), up to three times a run, then continued
with `--resume` until it finishes; each run's final model must be byte for byte the uninterrupted
run's, and its metrics must hold every step once, in order.
    python3 scripts/resume_check.py [--runs 12] [--seed 0] [--set key=value ...]
Each run builds its shards afresh (its own --data-dir), so kills land in the data stage too.
Needs a release build of xtask (`cargo build --release -p xtask`) and the default corpus
(`cargo xtask corpus --out data/corpus`)."""
import argparse, hashlib, json, os, random, shutil, signal, subprocess, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=12)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--set", action="append", default=[], help="extra settings, as pretrain's --set")
ap.add_argument("--xtask", default="target/release/xtask")
ap.add_argument("--input", default="data/corpus/corpus.jsonl")
a = ap.parse_args()
settings = ["blocks.max_tokens=150000", "train.checkpoint_every=3", "train.eval_every=4",
            "data.tokenizer.vocab_size=2048", "train.progress=false"] + a.set
xtask, corpus = os.path.abspath(a.xtask), os.path.abspath(a.input)


def command(data, out, resume):
    c = [xtask, "pretrain", "--input", corpus, "--data-dir", data, "--out", out]
    for s in settings:
        c += ["--set", s]
    return c + (["--resume"] if resume else [])


def model_sha(out):
    return hashlib.sha256(open(os.path.join(out, "model", "model.safetensors"), "rb").read()).hexdigest()


def steps(out):
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"kind":"step"' in l]
    return [(s["phase"], s["step"], s["global_step"]) for s in lines]


work = tempfile.mkdtemp(prefix="resume-check-")
t0 = time.time()
r = subprocess.run(command(f"{work}/d0", f"{work}/r0", False), capture_output=True, text=True)
duration = time.time() - t0
assert r.returncode == 0, r.stderr
want_model, want_steps = model_sha(f"{work}/r0"), steps(f"{work}/r0")
print(f"uninterrupted run: {duration:.1f} s, {len(want_steps)} steps, model sha256 {want_model[:16]}")
rng = random.Random(a.seed)
bad = 0
for run in range(1, a.runs + 1):
    data, out = f"{work}/d{run}", f"{work}/r{run}"
    kills, resume, proc = [], False, None
    for attempt in range(6):
        proc = subprocess.Popen(command(data, out, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if attempt < 3 and rng.random() < 0.8:
            at = rng.uniform(0, duration * 1.05)
            try:
                proc.wait(timeout=at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                kills.append(round(at, 2))
        _, err = proc.communicate()
        if proc.returncode == 0:
            break
        if proc.returncode != -signal.SIGKILL:
            print(f"run {run}: failed (exit {proc.returncode}) after kills at {kills} s:\n{err[-2000:]}")
            break
        resume = True
    if proc.returncode != 0:
        bad += 1
        continue
    same_model, same_steps = model_sha(out) == want_model, steps(out) == want_steps
    bad += not (same_model and same_steps)
    print(f"run {run}: killed at {kills} s; model {'identical' if same_model else 'DIFFERS'}, "
          f"steps {'identical' if same_steps else 'DIFFER'}")
shutil.rmtree(work, ignore_errors=True)
assert bad == 0, f"{bad} of {a.runs} runs did not end as the uninterrupted one"
print("OK")
