"""Outside-in check of zero-shot scoring: lm-evaluation-harness itself (its `hf` model on the
model directory, its own task YAMLs and preprocessing for ARC, PIQA, HellaSwag, WinoGrande, MMLU and
BIG-bench as the hub's dataset serves it (its multiple-choice template and filter),
pointed at local Parquet files) against `cargo xtask eval --task` on the same files. The tasks
are made from a JSONL corpus's lines (each line cut in two: the first half is the question, its
own second half the right answer, other lines' second halves the wrong ones), so any text works
and nothing is downloaded. Every question's log-likelihoods are compared too (lm-eval's
--log_samples against `eval --samples`): they must agree to 1e-3 nats. ARC again with questions longer than the context (both truncate
from the left). MMLU too, as its astronomy subject (the description line, lettered
options). And perplexity: lm-eval's WikiText task (its `loglikelihood_rolling` and its word and
byte counts) on whole documents of the corpus against `cargo xtask eval --text`: bits per byte
and word perplexity must agree to 1e-6 (a document spelling out the special tokens among them). lm-eval runs that one with `add_bos_token=False`: with
its default, lm-eval 0.4.13 puts a tokenizer's own BOS after the BOS it prefixes to a text
(lm-evaluation-harness issue #3333) and scores a BOS after BOS; patchlm prefixes one. acc and acc_norm must be equal, task by task.
    python3 scripts/lm_eval_check.py --model runs/pretrain/model --text data/corpus/corpus.jsonl
Needs lm-eval (with accelerate), torch, transformers, pyarrow; a release build of xtask."""
import argparse, json, os, random, re, shutil, subprocess, tempfile
import pyarrow as pa
import pyarrow.parquet as pq
import lm_eval

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--text", required=True, help="JSONL with a text field")
ap.add_argument("--xtask", default="target/release/xtask")
ap.add_argument("--n", type=int, default=150, help="records per task")
ap.add_argument("--seed", type=int, default=5)
a = ap.parse_args()

rng = random.Random(a.seed)
lines = [s.strip() for l in open(a.text, encoding="utf-8") for s in json.loads(l)["text"].split("\n")]
lines = [s for s in lines if 40 <= len(s) <= 110 and s.count(" ") >= 3]
rng.shuffle(lines)
it = iter(lines)


def halves(s):
    w = s.split(" ")
    return " ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])


def group(n):
    """n lines cut in halves: the first line's first half and every line's second half."""
    hs = [halves(next(it)) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    return hs[0][0], [hs[j][1] for j in order], order.index(0)


def arc(i):
    q, ch, gold = group(4)
    return {"id": f"a{i}", "question": q, "choices": {"text": ch, "label": list("ABCD")}, "answerKey": "ABCD"[gold]}


def arc_long(i):
    """ARC with questions longer than the model's context (left-truncated alike, BOS dropped)."""
    r = arc(i)
    r["question"] = " ".join(next(it) for _ in range(24)) + " " + r["question"]
    return r


def piqa(i):
    q, ch, gold = group(2)
    return {"goal": q, "sol1": ch[0], "sol2": ch[1], "label": gold}


def hellaswag(i):
    q, ch, gold = group(4)
    w = q.split(" ")
    ctx_a, ctx_b = " ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])
    if i % 5 == 0:  # WikiHow's markers, which lm-eval's preprocessing removes
        ctx_a += " [title]"
        ch = [c + " [step]" for c in ch]
    return {"ind": i, "activity_label": f"Verse {i % 7}", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            "endings": ch, "label": str(gold), "split": "val", "split_type": "indomain", "source_id": f"s{i}"}


def mmlu(i):
    q, ch, gold = group(4)
    return {"question": q, "subject": "astronomy", "choices": ch, "answer": gold}


def winogrande(i):
    s = next(it)
    w = s.split(" ")
    j = 1 + rng.randrange(len(w) - 2)
    other = rng.choice(next(it).split(" "))
    gold = rng.randrange(2)
    opts = [w[j], other] if gold == 0 else [other, w[j]]
    return {"sentence": " ".join(w[:j] + ["_"] + w[j + 1 :]), "option1": opts[0], "option2": opts[1],
            "answer": str(gold + 1)}


def bigbench(i):
    """BIG-bench as the hub's dataset serves it (lm-eval's hails/bigbench); every seventh record
    has no choices (a generative one), which lm-eval's filter and patchlm both drop."""
    q, ch, gold = group(3)
    if i % 7 == 3:
        return {"idx": i, "inputs": q, "targets": [ch[gold]], "multiple_choice_targets": [],
                "multiple_choice_scores": []}
    prompt = f"Q: {q}" + "".join(f"\n  choice: {c}" for c in ch) + "\nA:"
    return {"idx": i, "inputs": prompt, "targets": [ch[gold]], "multiple_choice_targets": ch,
            "multiple_choice_scores": [int(j == gold) for j in range(len(ch))]}


docs = [json.loads(l)["text"] for l in open(a.text, encoding="utf-8")]
docs = [d[:3000] for d in rng.sample(docs, min(12, len(docs)))]
# One document that spells out the tokenizer's special tokens: lm-eval's tokenizer reads each as
# its token, and so must `eval --text`.
specials = json.load(open(os.path.join(a.model, "tokenizer.json"), encoding="utf-8"))["added_tokens"]
docs.append(docs[0][:300] + "".join(f" {t['content']} " for t in specials if t["special"]) + docs[1][:300])

TASKS = {"arc": ("arc/arc_easy.yaml", arc), "arc_long": ("arc/arc_easy.yaml", arc_long), "piqa": ("piqa/piqa.yaml", piqa),
         "hellaswag": ("hellaswag/hellaswag.yaml", hellaswag), "winogrande": ("winogrande/default.yaml", winogrande),
         "mmlu": ("mmlu/default/mmlu_astronomy.yaml", mmlu),
         "bigbench": ("bigbench/multiple_choice_template_a_yaml", bigbench)}
lm_tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
work = tempfile.mkdtemp(prefix="lm_eval_check.")
for name, (yaml_rel, make) in TASKS.items():
    path = os.path.join(work, f"{name}.parquet")
    pq.write_table(pa.Table.from_pylist([make(i) for i in range(a.n)]), path)
    # lm-eval's own YAML and helper modules, with the dataset swapped for the local file.
    src = os.path.join(lm_tasks, os.path.dirname(yaml_rel))
    dst = os.path.join(work, "lm", name)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.yaml", "__pycache__"))
    y = open(os.path.join(lm_tasks, yaml_rel)).read()
    if name == "mmlu":  # a subject's YAML: its description line, the template it includes
        shutil.copy(os.path.join(src, "_default_template_yaml"), dst)
        y = re.sub(r'(?m)^"(tag|task|task_alias|dataset_name)":.*\n', "", y)
    y = re.sub(r"(?m)^(tag|task|dataset_path|dataset_name|training_split|validation_split|test_split):.*\n(  - .*\n)*", "", y)
    y = re.sub(r"(?m)^dataset_kwargs:.*\n(  .*\n)*", "", y)
    y = f"task: check_{name}\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {path}\n    dev: {path}\ntest_split: test\n" + y
    open(os.path.join(dst, f"check_{name}.yaml"), "w").write(y)

# lm-eval's WikiText task on the documents as they are (no WikiText detokenizing).
with open(os.path.join(work, "docs.jsonl"), "w") as f:
    f.writelines(json.dumps({"page": d}) + "\n" for d in docs)
dst = os.path.join(work, "lm", "wikitext")
shutil.copytree(os.path.join(lm_tasks, "wikitext"), dst, ignore=shutil.ignore_patterns("*.yaml", "__pycache__"))
y = open(os.path.join(lm_tasks, "wikitext", "wikitext.yaml")).read()
y = re.sub(r"(?m)^(task|dataset_path|dataset_name|training_split|validation_split|test_split|doc_to_target):.*\n", "", y)
y = f"task: check_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {work}/docs.jsonl\n" \
    "test_split: test\ndoc_to_target: '{{page}}'\n" + y
open(os.path.join(dst, "check_text.yaml"), "w").write(y)

env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")


theirs = {}
for tasks, extra in ([f"check_{n}" for n in TASKS], ""), (["check_text"], ",add_bos_token=False"):
    out = os.path.join(work, "out" + extra)
    run(["lm_eval", "--model", "hf", "--model_args", f"pretrained={os.path.abspath(a.model)},dtype=float32{extra}",
         "--tasks", ",".join(tasks), "--include_path", os.path.join(work, "lm"), "--device", "cpu",
         "--batch_size", "16", "--output_path", out, "--log_samples"], env=env)
    (result,) = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    theirs.update(json.load(open(result))["results"])
ours_json = os.path.join(work, "ours.json")
with open(os.path.join(work, "docs_text.jsonl"), "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
run([a.xtask, "eval", "--model", a.model, "--json", ours_json, "--samples", "--text", os.path.join(work, "docs_text.jsonl")]
    + [x for n in TASKS for x in ("--task", os.path.join(work, f"{n}.parquet"))], env=dict(os.environ, RUST_BACKTRACE="0"))
ours_all = json.load(open(ours_json))
ours = {t["task"]: t for t in ours_all["tasks"]}


def lm_eval_samples(task):
    """lm-eval's per-question log-likelihoods of a task, by doc_id."""
    (f,) = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(work, "out")) for f in fs
            if re.match(rf"samples_{task}_\d{{4}}-", f)]
    rows = sorted((json.loads(l) for l in open(f)), key=lambda r: r["doc_id"])
    return [[float(ll) for ll, _ in r["filtered_resps"]] for r in rows]


print(f"{'task':<12}{'n':>5}{'lm-eval acc':>13}{'patchlm acc':>13}{'lm-eval norm':>14}{'patchlm norm':>14}")
ok, worst = True, 0.0
for n in TASKS:
    t, o = theirs[f"check_{n}"], ours[n]
    norm_t, norm_o = t.get("acc_norm,none"), o.get("acc_norm") if "acc_norm,none" in t else None
    print(f"{n:<12}{o['n']:>5}{t['acc,none']:>13.4f}{o['acc']:>13.4f}"
          + (f"{norm_t:>14.4f}{norm_o:>14.4f}" if norm_t is not None else ""))
    want_n = a.n - (sum(i % 7 == 3 for i in range(a.n)) if n == "bigbench" else 0)
    ok &= o["n"] == want_n and abs(t["acc,none"] - o["acc"]) < 1e-9 and (norm_t is None or abs(norm_t - norm_o) < 1e-9)
    theirs_ll, ours_ll = lm_eval_samples(f"check_{n}"), [s["loglikelihoods"] for s in o["samples"]]
    ok &= len(theirs_ll) == len(ours_ll) and all(len(x) == len(y) for x, y in zip(theirs_ll, ours_ll))
    worst = max([worst] + [abs(x - y) for tx, oy in zip(theirs_ll, ours_ll) for x, y in zip(tx, oy)])
print(f"every choice's log-likelihood: max |lm-eval − patchlm| {worst:.2e} nats")
ok &= worst < 1e-3
t, o = theirs["check_text"], ours_all["perplexity"]
print(f"{'text':<12}{o['documents']:>5}  bits per byte: lm-eval {t['bits_per_byte,none']:.6f}, patchlm "
      f"{o['bits_per_byte']:.6f}; word perplexity: lm-eval {t['word_perplexity,none']:.4f}, patchlm {o['word_perplexity']:.4f}")
ok &= o["documents"] == len(docs) and abs(t["bits_per_byte,none"] - o["bits_per_byte"]) < 1e-6 * o["bits_per_byte"]
ok &= abs(t["word_perplexity,none"] - o["word_perplexity"]) < 1e-6 * o["word_perplexity"]
shutil.rmtree(work)
assert ok, "lm-eval and patchlm disagree"
print("OK")
