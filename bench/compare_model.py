"""Training-step throughput side by side: patchlm (`cargo xtask bench model`) vs PyTorch with the
same LLaMA shapes (RMSNorm, RoPE, SwiGLU, untied head), the same loss (token k=1, patch k=4), AdamW
and grad clipping; on CPU with the same thread count, on CUDA in the same device call.
    python3 bench/compare_model.py --preset small --batch 16 --ctx 128 --threads 2
    python3 bench/compare_model.py --device cuda --dtype bf16 --compile --preset gpt2-small --batch 8 --ctx 1024
With --profile, one more step of each is timed by kind of work (matmul, attention forward and
backward, optimizer, the rest): ours by the named spans of `xtask bench model --profile`, PyTorch's
with torch.profiler (GPU kernels by name; on the CPU, aten ops by self time), side by side.
MFU = tokens/s x (6 W + 12 L d T) / peak, W the weights of matrix products (the LM head; not the
embedding lookup or the norms), peak 989 TFLOP/s (H100 dense bf16) unless --peak.
Needs torch; a release build of xtask (with --features cuda for --device cuda)."""
import argparse, json, math, os, subprocess, time
import torch, torch.nn as nn, torch.nn.functional as F

PRESETS = {"tiny": (32, 64, 2, 4, 2, 256), "small": (256, 688, 4, 4, 4, 8192), "gpt2-small": (768, 2048, 12, 12, 12, 50304),
           "370m": (1024, 2752, 24, 16, 16, 32000)}

class Norm(nn.Module):
    def __init__(self, d):
        super().__init__(); self.weight = nn.Parameter(torch.ones(d))
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

class Layer(nn.Module):
    def __init__(self, d, f, h, kv):
        super().__init__(); self.h, self.kv, self.hd = h, kv, d // h
        self.n1, self.n2 = Norm(d), Norm(d)
        self.q = nn.Linear(d, d, bias=False); self.k = nn.Linear(d, kv * self.hd, bias=False)
        self.v = nn.Linear(d, kv * self.hd, bias=False); self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, f, bias=False); self.up = nn.Linear(d, f, bias=False); self.down = nn.Linear(f, d, bias=False)
    def forward(self, x, cos, sin):
        b, t, d = x.shape
        y = self.n1(x)
        def heads(z, n): return z.view(b, t, n, self.hd).transpose(1, 2)
        def rot(z):
            z1, z2 = z[..., : self.hd // 2], z[..., self.hd // 2 :]
            return z * cos + torch.cat((-z2, z1), -1) * sin
        q, k, v = rot(heads(self.q(y), self.h)), rot(heads(self.k(y), self.kv)), heads(self.v(y), self.kv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))

class Model(nn.Module):
    def __init__(self, d, f, L, h, kv, V, T):
        super().__init__()
        self.emb = nn.Embedding(V, d); self.layers = nn.ModuleList(Layer(d, f, h, kv) for _ in range(L))
        self.norm = Norm(d); self.head = nn.Linear(d, V, bias=False)
        hd = d // h; inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        fr = torch.outer(torch.arange(T).float(), inv); e = torch.cat((fr, fr), -1)
        self.register_buffer("cos", e.cos()); self.register_buffer("sin", e.sin())
    def loss(self, ids, k):
        b, n = ids.shape; p = n // k
        x = self.emb(ids[:, : (p - 1) * k])
        if k > 1: x = x.view(b, p - 1, k, -1).mean(2)
        t = p - 1
        for l in self.layers: x = l(x, self.cos[:t], self.sin[:t])
        lp = F.log_softmax(self.head(self.norm(x)).float(), -1)
        return -lp.gather(-1, ids[:, k:].reshape(b, t, k)).mean()

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="small"); ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--ctx", type=int, default=128); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--steps", type=int, default=5); ap.add_argument("--xtask", default="target/release/xtask")
ap.add_argument("--device", default="cpu"); ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
ap.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
ap.add_argument("--peak", type=float, default=989e12)
ap.add_argument("--ks", default="1,4")
ap.add_argument("--torch-ks", default=None,
                help="PyTorch's patch sizes, if fewer than ours (each costs torch.compile a warm-up; the "
                     "patch-phase target is against our own token phase)")
ap.add_argument("--attention", default="softmax", choices=["softmax", "flash", "both"],
                help="our attention kernel(s): a row for each")
ap.add_argument("--backward", default="tape", choices=["tape", "autograd", "both"],
                help="our backward pass(es): the hand-written tape, candle's autograd, or a row for each")
ap.add_argument("--profile", action="store_true",
                help="one more step of each side timed by kind of work, and a table of the kinds")
a = ap.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)
if dev.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
d, f, L, h, kv, V = PRESETS[a.preset]
ks = [int(x) for x in a.ks.split(",")]
torch_ks = [int(x) for x in (a.torch_ks or a.ks).split(",")]
def flops_per_token(m):
    # As patchlm's ModelConfig::flops_per_position: 6 per weight of a matrix product (not the
    # embedding lookup, not the norms) + 12·L·d·T for attention.
    n = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))
    return 6 * n + 12 * L * d * a.ctx
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
# Ours first: torch's OpenMP workers keep spinning for a while after its last step and would
# steal the cores from a subprocess started right after.
env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
cmd = [a.xtask, "bench", "model", "--preset", a.preset, "--batch", str(a.batch), "--ctx", str(a.ctx),
       "--k", a.ks, "--steps", str(a.steps), "--device", a.device, "--dtype", a.dtype, "--attention", a.attention,
       "--backward", a.backward] + (["--profile"] if a.profile else [])
out = subprocess.run(cmd, capture_output=True, text=True, env=env)
if out.returncode != 0:
    print(out.stdout, out.stderr); raise SystemExit(f"xtask bench failed: {' '.join(cmd)}")
ours = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
# Every measurement is printed as soon as it exists, so that a run cut short by a time limit
# still leaves its numbers; the ratio table follows at the end.
for o in ours:
    print(f"patchlm {o.get('attention', '')} {o.get('backward', '')} k={o['k']}: {o['tokens_per_s']:.0f} tok/s, MFU "
          f"{100 * (o.get('mfu') or float('nan')):.1f}%, step {o['step_ms']:.1f} ms, peak "
          f"{(o.get('peak_mem_gib') or float('nan')):.2f} GiB (by parts, {o.get('parts_step_ms', float('nan')):.1f} ms: "
          f"enqueue {o.get('fwd_enqueue_ms', float('nan')):.1f}, "
          f"fwd {o.get('fwd_ms', float('nan')):.1f}, bwd enqueue {o.get('bwd_enqueue_ms', float('nan')):.1f}, "
          f"bwd {o.get('bwd_ms', float('nan')):.1f}, "
          f"clip+opt {o.get('opt_ms', float('nan')):.1f} ms; opt-in {o.get('optin')})", flush=True)
KINDS = ["matmul", "attention fwd", "attention bwd", "optimizer", "rest"]

def torch_kind(name):
    """The kind of work of a CUDA kernel (or, on the CPU, an aten op) by its name."""
    n = name.lower()
    if n.startswith("triton"):  # Inductor's fused kernels, named after the ops they fuse
        return "rest"
    if any(w in n for w in ("flash", "fmha", "sdpa", "attention", "attn")):
        bwd = any(w in n for w in ("bwd", "backward", "bprop", "cutlassb", "dgrad"))
        return "attention bwd" if bwd else "attention fwd"
    if any(w in n for w in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::bmm", "aten::addmm")):
        return "matmul"
    if any(w in n for w in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    return "rest"

def our_kind(name):
    """The kind of work of one of our spans (`pass.kind.detail`)."""
    kind = name.split(".")[1] if name.count(".") >= 1 else name
    if kind == "attention":
        return "attention bwd" if name.startswith("bwd") else "attention fwd"
    return kind if kind in ("matmul", "optimizer") else "rest"

def profile_torch(step):
    """One step under torch.profiler: ms by kind, and the ten costliest kernels (ops)."""
    from torch.profiler import profile, ProfilerActivity
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step(); sync()
    by_kind, by_name = {k: 0.0 for k in KINDS}, {}
    for e in prof.key_averages():
        if cuda:
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        else:
            us = e.self_cpu_time_total if e.key.startswith("aten::") else 0.0
        if us > 0:
            by_kind[torch_kind(e.key)] += us / 1e3
            by_name[e.key] = by_name.get(e.key, 0.0) + us / 1e3
    return by_kind, sorted(by_name.items(), key=lambda kv: -kv[1])[:10]

profiles = []
rows = []
modes = ["eager"] + (["compile"] if a.compile else [])
for mode in modes:
    for k in torch_ks:
        torch.manual_seed(0)
        m = Model(d, f, L, h, kv, V, a.ctx).to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                **({"fused": True} if dev.type == "cuda" else {}))
        ids = torch.randint(0, V, (a.batch, k * (a.ctx + 1)), device=dev)
        loss_fn = torch.compile(m.loss) if mode == "compile" else m.loss
        if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
        ts = []
        for s in range(a.steps + 3):
            sync(); t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                loss = loss_fn(ids, k)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
            sync()
            if s >= 3: ts.append(time.perf_counter() - t0)
        step = sorted(ts)[len(ts) // 2]
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        if a.profile:
            def one_step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                    loss = loss_fn(ids, k)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
            by_kind, top = profile_torch(one_step)
            profiles.append((mode, k, by_kind))
            print(f"torch {mode} k={k} profile (ms): " + ", ".join(f"{kk} {v:.2f}" for kk, v in by_kind.items())
                  + "; costliest: " + "; ".join(f"{n[:60]} {v:.2f}" for n, v in top), flush=True)
        tps = a.batch * a.ctx * k / step
        rows.append((mode, k, tps, step, mem, tps / k * flops_per_token(m) / a.peak))
        print(f"torch {mode} k={k}: {tps:.0f} tok/s, MFU {100 * rows[-1][5]:.1f}%, step {1e3 * step:.1f} ms, "
              f"peak {mem:.2f} GiB", flush=True)
        del m, opt
print(f"preset {a.preset}, batch {a.batch} x ctx {a.ctx} positions, {a.device} {a.dtype}, "
      f"{a.threads} CPU threads, torch {torch.__version__}, MFU peak {a.peak:.3g} FLOP/s")
print(f"{'torch mode':>10}{'k':>3}{'torch tok/s':>13}{'MFU':>7}{'ms':>8}{'GiB':>7}"
      f"{'patchlm':>18}{'tok/s':>10}{'MFU':>7}{'ms':>8}{'GiB':>7}{'ratio':>8}")
for mode, k, tps, step, mem, mfu in rows:
    for o in (o for o in ours if o["k"] == k):
        print(f"{mode:>10}{k:>3}{tps:>13.0f}{100 * mfu:>6.1f}%{1e3 * step:>8.1f}{mem:>7.2f}"
              f"{o.get('attention', '') + '/' + o.get('backward', ''):>18}{o['tokens_per_s']:>10.0f}{100 * (o.get('mfu') or float('nan')):>6.1f}%"
              f"{o['step_ms']:>8.1f}{(o.get('peak_mem_gib') or float('nan')):>7.2f}{o['tokens_per_s'] / tps:>8.2f}")
if profiles:
    print(f"one step by kind of work (ms), {'GPU kernel' if dev.type == 'cuda' else 'CPU op'} time "
          "(ours: spans, the step's time outside them in 'rest')")
    print(f"{'torch mode':>10}{'k':>3}  {'kind':<15}{'torch':>9}{'patchlm':>18}{'ms':>9}{'ours - torch':>14}")
    for mode, k, by_kind in profiles:
        for o in (o for o in ours if o["k"] == k and "profile" in o):
            mine = {kk: 0.0 for kk in KINDS}
            for name, ms in o["profile"].items():
                mine[our_kind(name)] += ms
            mine["rest"] += o["profile_step_ms"] - sum(o["profile"].values())
            label = o.get("attention", "") + "/" + o.get("backward", "")
            for kk in KINDS:
                print(f"{mode:>10}{k:>3}  {kk:<15}{by_kind[kk]:>9.2f}{label:>18}{mine[kk]:>9.2f}{mine[kk] - by_kind[kk]:>14.2f}")
# Our patch phase against our token phase, span by span (the patch-phase target is against our
# own token phase, and the positions per step are the same: what the patch phase adds shows here).
for o in ours:
    base = next((b for b in ours if b["k"] == 1 and "profile" in b and b.get("attention") == o.get("attention")
                 and b.get("backward") == o.get("backward")), None)
    if o["k"] == 1 or "profile" not in o or base is None:
        continue
    names = sorted(set(o["profile"]) | set(base["profile"]),
                   key=lambda n: -abs(o["profile"].get(n, 0.0) - base["profile"].get(n, 0.0)))
    outside = (o["profile_step_ms"] - sum(o["profile"].values())) - (base["profile_step_ms"] - sum(base["profile"].values()))
    print(f"patchlm {o.get('attention')}/{o.get('backward')} k={o['k']} against k=1, profiled step "
          f"{o['profile_step_ms']:.2f} against {base['profile_step_ms']:.2f} ms; largest differences by span (ms): "
          + ", ".join(f"{n} {o['profile'].get(n, 0.0) - base['profile'].get(n, 0.0):+.3f}" for n in names[:8])
          + f", outside spans {outside:+.3f}", flush=True)
print("patchlm step breakdown (ms): " + "; ".join(
    f"{o.get('attention')}/{o.get('backward')} k={o['k']}: step {o.get('parts_step_ms', float('nan')):.1f} "
    f"synchronised by parts, enqueue {o['fwd_enqueue_ms']:.1f}, fwd {o['fwd_ms']:.1f}, "
    f"bwd {o['bwd_ms']:.1f}, clip+opt {o['opt_ms']:.1f}" for o in ours if "fwd_ms" in o))
