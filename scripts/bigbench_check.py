"""Outside-in check of BIG-bench tasks: BIG-bench's own JsonTask (the `bigbench` 0.0.1 package:
its zero-shot prompts, its duplicate removal, its subtasks and its `multiple_choice_grade`)
with lm-evaluation-harness's `hf` model on the model directory answering its `cond_log_prob`,
against `cargo xtask eval --task task.json` on the same files. The tasks are made from a JSONL
corpus's lines (each line cut in two: the first half is the question, its own second half the
right answer, other lines' second halves the wrong ones): one with BIG-bench's default prompt
settings, one with its own prefixes and partial credit (several answers earning something), and
a composite task whose two subtasks sit in folders beside it. The grades must be equal and every
choice's log-likelihood within 1e-3 nats.

    pip install --no-deps bigbench==0.0.1
    python3 scripts/bigbench_check.py --model runs/pretrain/model --text data/corpus/corpus.jsonl

Needs lm-eval, torch, transformers, numpy, scipy; a release build of xtask. BIG-bench imports
TensorFlow, T5, sklearn and datasets for metrics of generated text, which are stubbed here (the
multiple-choice path uses none of them; its file functions from TensorFlow are the standard
library's)."""
import argparse, glob, json, os, random, shutil, subprocess, sys, tempfile, types

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--text", required=True, help="JSONL with a text field")
ap.add_argument("--xtask", default="target/release/xtask")
ap.add_argument("--n", type=int, default=60, help="questions per task")
ap.add_argument("--seed", type=int, default=11)
a = ap.parse_args()

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402


# BIG-bench's imports for metrics of generated text, stubbed while it loads; then the real
# modules (lm-eval's datasets, torch's lookups of sklearn) are back.
gfile = types.SimpleNamespace(isdir=os.path.isdir, glob=glob.glob, GFile=open)
STUBS = {"tensorflow": {}, "tensorflow.compat": {}, "tensorflow.compat.v1": {},
         "tensorflow.compat.v2": {"io": types.SimpleNamespace(gfile=gfile)}, "t5": {}, "t5.evaluation": {}, "t5.evaluation.metrics": {}, "sklearn": {},
         "sklearn.metrics": {"f1_score": None}, "datasets": {"load_metric": None}}
saved = {k: sys.modules.pop(k) for k in STUBS if k in sys.modules}
for name, attrs in STUBS.items():
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__dict__.update(attrs)
import bigbench.api.json_task as json_task  # noqa: E402
for name in STUBS:
    del sys.modules[name]
sys.modules.update(saved)

rng = random.Random(a.seed)
lines = [s.strip() for l in open(a.text, encoding="utf-8") for s in json.loads(l)["text"].split("\n")]
lines = [s for s in lines if 40 <= len(s) <= 110 and s.count(" ") >= 3]
rng.shuffle(lines)
it = iter(lines)


def question(n, partial=False):
    """A line's first half; its second half scores 1, other lines' second halves 0 (or, with
    partial credit, some of them ½ or ¼)."""
    hs = []
    for _ in range(n):
        w = next(it).split(" ")
        hs.append((" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2:])))
    scores = {hs[0][1]: 1}
    for _, wrong in hs[1:]:
        scores[wrong] = rng.choice([0, 0.25, 0.5]) if partial else 0
    keys = list(scores)
    rng.shuffle(keys)
    return {"input": hs[0][0], "target_scores": {k: scores[k] for k in keys}}


def task(name, examples, **settings):
    return {"canary": "patchlm check", "name": name, "description": "made from a corpus", "keywords": ["check"],
            "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade", **settings,
            "examples": examples}


work = tempfile.mkdtemp(prefix="bigbench_check.")
plain = [question(rng.randint(2, 6)) for _ in range(a.n)]
plain.append(dict(plain[0]))  # a duplicate, dropped by both
files = {
    "plain/task.json": task("plain", plain),
    "custom/task.json": task("custom", [question(rng.randint(2, 5), partial=True) for _ in range(a.n)],
                             task_prefix="Finish each line.\n", example_input_prefix="Line: ",
                             example_output_prefix="\nEnding:", choice_prefix="\n - "),
    "composite/task.json": {"canary": "patchlm check", "name": "composite", "description": "two subtasks",
                            "keywords": ["check"]},
    "composite/first/task.json": task("first", [question(3) for _ in range(a.n // 2)]),
    "composite/second/task.json": task("second", [question(4) for _ in range(a.n // 2)],
                                       append_choices_to_input=False, example_input_prefix="",
                                       example_output_prefix=""),
}
for rel, data in files.items():
    os.makedirs(os.path.dirname(os.path.join(work, rel)), exist_ok=True)
    with open(os.path.join(work, rel), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
tops = ["plain/task.json", "custom/task.json", "composite/task.json"]


class LmEvalModel:
    """BIG-bench's model interface, answered by lm-eval's HF model (its pair encoding, its BOS)."""

    def __init__(self, path):
        self.lm = HFLM(pretrained=os.path.abspath(path), dtype="float32", device="cpu", batch_size=16)
        self.asked = []

    def cond_log_prob(self, inputs, targets, absolute_normalization=True):
        reqs = [Instance("loglikelihood", {}, (x, t), i) for i, (x, ts) in enumerate(zip(inputs, targets)) for t in ts]
        lls = iter(ll for ll, _ in self.lm.loglikelihood(reqs, disable_tqdm=True))
        out = [[next(lls) for _ in ts] for ts in targets]
        self.asked += [dict(zip(ts, o)) for ts, o in zip(targets, out)]
        return out


model = LmEvalModel(a.model)
theirs = {}
for rel in tops:
    t = json_task.JsonTask(os.path.join(work, rel))
    start = len(model.asked)
    scores = t.evaluate_model(model)
    grade = [s.score_dict["multiple_choice_grade"] for s in scores if s.subtask_description == t.name][0]
    theirs[rel] = (grade, model.asked[start:])

ours_json = os.path.join(work, "ours.json")
cmd = [a.xtask, "eval", "--model", a.model, "--json", ours_json, "--samples"]
cmd += [x for rel in tops for x in ("--task", os.path.join(work, rel))]
r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RUST_BACKTRACE="0"))
if r.returncode != 0:
    raise SystemExit(f"xtask eval failed ({r.returncode}):\n{r.stderr[-3000:]}")
ours = json.load(open(ours_json))["tasks"]

ok, worst = True, 0.0
print(f"{'task':<22}{'n':>5}{'BIG-bench grade':>17}{'patchlm acc':>13}")
for rel, o in zip(tops, ours):
    grade, asked = theirs[rel]
    print(f"{rel:<22}{o['n']:>5}{grade:>17.4f}{o['acc']:>13.4f}")
    ok &= o["n"] == len(asked) and abs(grade - o["acc"]) < 1e-9
    # Both in the file's order of choices.
    for q, s in zip(asked, o["samples"]):
        theirs_ll = list(q.values())
        ok &= len(theirs_ll) == len(s["loglikelihoods"])
        worst = max([worst] + [abs(x - y) for x, y in zip(theirs_ll, s["loglikelihoods"])])
print(f"every choice's log-likelihood: max |BIG-bench via lm-eval − patchlm| {worst:.2e} nats")
ok &= worst < 1e-3
shutil.rmtree(work)
assert ok, "BIG-bench and patchlm disagree"
print("OK")
