"""Outside-in check of the trainer: every training step of a `cargo xtask pretrain` run, redone
in PyTorch. The run checkpoints after every step; for each step the check loads the checkpoint
before it into HF transformers' LlamaForCausalLM (in float64) and torch.optim.AdamW (the moments and step
count from `optimizer.safetensors`, a fresh optimizer where a phase starts, as the paper resets
it), takes the step's blocks from the phase's block file (read with pyarrow), computes the
paper's patch loss (mean of K token embeddings in, one distribution scored against each of the
next patch's K tokens; K = 1 in the token phase) over the whole step's batch at once, clips with
torch.nn.utils.clip_grad_norm_, sets the learning rate by linear warmup and cosine decay, and
steps. The loss, the gradient norm and the learning rate must equal what `metrics.jsonl` logged,
and the new weights the next checkpoint's. It covers both phases and the switch between them,
micro-batches of uneven size (the run's micro_batch does not divide a step), clipping, weight
decay on matrices only, the schedule, and several passes over the data (six epochs of a small
slice: each phase's steps run past the end of its block file into a pass in an order of its own,
re-derived here from the permutation's documentation).

    python3 scripts/train_check.py            # needs torch, transformers, safetensors, pyarrow
    python3 scripts/train_check.py --set model.tie_word_embeddings=true   # a tied LM head

Runs `target/release/xtask pretrain` on the default corpus (the `tiny` preset, about 10 s)."""
import argparse, json, math, os, shutil, subprocess, tempfile

import pyarrow as pa
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--xtask", default="target/release/xtask")
ap.add_argument("--steps", type=int, default=6, help="steps per phase")
ap.add_argument("--set", action="append", default=[], help="more pretrain settings, e.g. model.tie_word_embeddings=true")
a = ap.parse_args()
torch.manual_seed(0)

run = tempfile.mkdtemp(prefix="train_check.")
sets = ["preset=tiny", "blocks.max_tokens=6000", "blocks.epochs=6", "train.tokens_per_step=1536", "train.micro_batch=2",
        "train.checkpoint_every=1", "train.keep_checkpoints=100000", "train.eval_every=100000",
        "train.warmup_steps=3", "train.lr=0.003", "train.grad_clip=0.9", "train.min_lr_ratio=0.1",
        f"train.max_steps_per_phase={a.steps}", "train.progress=false"] + a.set
cmd = [a.xtask, "pretrain", "--out", os.path.join(run, "run")] + [x for s in sets for x in ("--set", s)]
r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RUST_BACKTRACE="0"))
if r.returncode != 0:
    raise SystemExit(f"xtask pretrain failed ({r.returncode}):\n{r.stderr[-3000:]}")
run = os.path.join(run, "run")

logged = {m["global_step"]: m for m in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if m["kind"] == "step"}
manifest = json.load(open(os.path.join(run, "patchdata", "patch_manifest.json")))
cks = sorted(os.listdir(os.path.join(run, "checkpoints")))
ck = lambda g: os.path.join(run, "checkpoints", f"step-{g:08d}")
cfg = json.load(open(os.path.join(ck(1), "run_config.json")))
tc = cfg["train"]
phases = [("patch", cfg["patch"]["k"], manifest["patch_phase"]), ("token", 1, manifest["token_phase"])]
blocks = {}
passes = set()  # the passes over a block file the checked steps read


def phase_plan(i):
    """(K, blocks per step, steps, block array) of phase i, as the trainer plans it."""
    name, k, f = phases[i]
    if name not in blocks:
        t = pa.ipc.open_file(pa.memory_map(os.path.join(run, "patchdata", f["file"]))).read_all()
        flat = t.column("tokens").combine_chunks().flatten().to_numpy().astype("int64")
        blocks[name] = torch.from_numpy(flat).view(-1, f["block_len"])
    per_block = f["block_len"] - 1 if k == 1 else f["block_len"]  # a token block is T + 1 tokens
    bps = tc["tokens_per_step"] // per_block
    steps = round(f["blocks"] * f["epochs"]) // bps
    if tc["max_steps_per_phase"]:
        steps = min(steps, tc["max_steps_per_phase"])
    return k, bps, steps, blocks[name]


M64 = (1 << 64) - 1


def splitmix64(state):
    """SplitMix64: (the next state, its output)."""
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def permuted_index(i, n, key):
    """Element i of the documented keyed permutation of 0..n a later pass reads blocks in: four
    Feistel rounds (round keys from SplitMix64(key), round function SplitMix64(r ^ round key)) on
    half = ceil(bits(n - 1) / 2) bits a side, repeated while the result is not below n."""
    if n <= 1:
        return 0
    half = ((n - 1).bit_length() + 1) // 2
    mask, s, keys = (1 << half) - 1, key, []
    for _ in range(4):
        s, v = splitmix64(s)
        keys.append(v)
    x = i % n
    while True:
        l, r = x >> half, x & mask
        for k in keys:
            l, r = r, l ^ (splitmix64(r ^ k)[1] & mask)
        x = (l << half) | r
        if x < n:
            return x


def step_blocks(i, p, bps):
    """The blocks of step p of phase i: blocks p·bps.. of the phase's stream, pass g // n of block
    g reading the file in order (pass 0) or permuted, keyed by the FNV-1a hash of the file's
    sha256 string and the pass (later passes)."""
    _, _, f = phases[i]
    blk, n = phase_plan(i)[3], f["blocks"]
    key = 0xCBF29CE484222325
    for b in f["sha256"].encode():
        key = ((key ^ b) * 0x100000001B3) & M64
    passes.update(g // n for g in range(p * bps, (p + 1) * bps))
    order = [g % n if g < n else permuted_index(g % n, n, key ^ (g // n)) for g in range(p * bps, (p + 1) * bps)]
    return blk[order]


def lr_at(step, total):
    """Linear warmup to lr over warmup_steps (capped at the phase), then cosine to lr·min_lr_ratio."""
    lr, low, warm = tc["lr"], tc["lr"] * tc["min_lr_ratio"], min(tc["warmup_steps"], total)
    if step < warm:
        return lr * (step + 1) / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * progress))


def patch_loss(model, ids, k):
    """The paper's patch objective: n patches of K tokens; patches 0..n-2 in (mean embeddings),
    each position's one distribution scored on every token of the next patch."""
    b, n = ids.shape[0], ids.shape[1] // k
    x = model.model.embed_tokens(ids[:, : (n - 1) * k].reshape(b, n - 1, k)).mean(2)
    logp = torch.log_softmax(model(inputs_embeds=x).logits.float(), -1)
    return -logp.gather(-1, ids[:, k:].reshape(b, n - 1, k)).mean()


worst = {"loss": 0.0, "grad_norm": 0.0, "lr": 0.0, "weights": 0.0, "ill-conditioned": 0.0}
steps_checked = []
last = int(cks[-1].split("-")[1])
for g in range(1, last):
    before, after = json.load(open(os.path.join(ck(g), "state.json"))), json.load(open(os.path.join(ck(g + 1), "state.json")))
    phase, p = after["phase"], after["phase_step"] - 1
    if after["phase_step"] == 0:  # the last step of a phase: its checkpoint points at the next one
        phase, p = before["phase"], before["phase_step"]
    k, bps, total, _ = phase_plan(phase)
    model = LlamaForCausalLM.from_pretrained(ck(g), torch_dtype=torch.float64)
    params = dict(model.named_parameters())
    decay = [v for n, v in params.items() if v.dim() >= 2]
    no_decay = [v for n, v in params.items() if v.dim() < 2]
    lr = lr_at(p, total)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc["adamw"]["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            betas=(tc["adamw"]["beta1"], tc["adamw"]["beta2"]), eps=tc["adamw"]["eps"])
    if before["phase"] == phase and before["optimizer_step"] > 0:
        moments = load_file(os.path.join(ck(g), "optimizer.safetensors"))
        for n, v in params.items():
            opt.state[v] = {"step": torch.tensor(float(before["optimizer_step"])),
                            "exp_avg": moments[f"m.{n}"].double(), "exp_avg_sq": moments[f"v.{n}"].double()}
    loss = patch_loss(model, step_blocks(phase, p, bps), k)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), tc["grad_clip"]))
    opt.step()
    want = load_file(os.path.join(ck(g + 1), "model.safetensors"))
    m = logged[g + 1]
    assert m["k"] == k and m["step"] == p + 1, (g, m)
    worst["loss"] = max(worst["loss"], abs(loss.item() - m["loss"]) / abs(m["loss"]))
    worst["grad_norm"] = max(worst["grad_norm"], abs(norm - m["grad_norm"]) / m["grad_norm"])
    worst["lr"] = max(worst["lr"], abs(lr - m["lr"]) / m["lr"])
    for n, v in params.items():
        # Where a gradient is below 10·eps, AdamW's g/(sqrt(v)+eps) turns its float32 rounding
        # into the update: such elements are bounded by one step's size (lr) instead.
        diff, scale = (v.detach() - want[n].double()).abs(), want[n].abs().max()
        well = v.grad.abs() >= 10 * tc["adamw"]["eps"]
        if well.any():
            worst["weights"] = max(worst["weights"], float(diff[well].max() / scale))
        if (~well).any():
            worst["ill-conditioned"] = max(worst["ill-conditioned"], float(diff[~well].max() / lr))
    steps_checked.append((g + 1, phases[phase][0], p + 1, loss.item(), m["loss"], norm, m["grad_norm"]))

print(f"{'step':>5} {'phase':>6} {'#':>3} {'torch loss':>12} {'patchlm':>12} {'torch |g|':>11} {'patchlm':>11}")
for s in steps_checked:
    print(f"{s[0]:>5} {s[1]:>6} {s[2]:>3} {s[3]:>12.6f} {s[4]:>12.6f} {s[5]:>11.6f} {s[6]:>11.6f}")
print("largest relative differences: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
shutil.rmtree(os.path.dirname(run))
clipped = sum(s[5] > tc["grad_clip"] for s in steps_checked)
assert 0 < clipped < len(steps_checked), "some steps must clip and some not"
assert {s[1] for s in steps_checked} == {"patch", "token"}, "the run must cross phases"
# The reference runs in float64, patchlm in float32. Weights are compared relative to each
# tensor's largest (decay on the norms too would be 3e-4 off); those with gradients below 10·eps
# relative to the step's learning rate.
assert worst["loss"] < 1e-5 and worst["grad_norm"] < 1e-5 and worst["lr"] < 1e-12, worst
assert worst["weights"] < 2e-5 and worst["ill-conditioned"] < 0.5, worst
assert max(passes) >= 1, "some steps must read a later pass over the data"
print(f"OK ({len(steps_checked)} steps, {clipped} clipped, passes {min(passes)}-{max(passes)} read)")
