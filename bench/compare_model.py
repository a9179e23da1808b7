"""CPU training-step throughput side by side: patchlm (`cargo xtask bench model`) vs PyTorch with
the same LLaMA shapes (RMSNorm, RoPE, SwiGLU, untied head), the same loss (token k=1, patch k=4),
AdamW and grad clipping, and the same thread count.
    python3 bench/compare_model.py --preset small --batch 16 --ctx 128 --threads 2
Needs torch; a release build of xtask."""
import argparse, json, math, os, subprocess, time
import torch, torch.nn as nn, torch.nn.functional as F

PRESETS = {"tiny": (32, 64, 2, 4, 2, 256), "small": (256, 688, 4, 4, 4, 8192), "gpt2-small": (768, 2048, 12, 12, 12, 50304)}

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
a = ap.parse_args()
torch.set_num_threads(a.threads)
d, f, L, h, kv, V = PRESETS[a.preset]
rows = []
for k in (1, 4):
    torch.manual_seed(0)
    m = Model(d, f, L, h, kv, V, a.ctx)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, V, (a.batch, k * (a.ctx + 1)))
    ts = []
    for s in range(a.steps + 2):
        t0 = time.perf_counter()
        loss = m.loss(ids, k); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        if s >= 2: ts.append(time.perf_counter() - t0)
    rows.append((k, a.batch * a.ctx * k / sorted(ts)[len(ts) // 2]))
env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
out = subprocess.run([a.xtask, "bench", "model", "--preset", a.preset, "--batch", str(a.batch), "--ctx", str(a.ctx),
                      "--k", "1,4", "--steps", str(a.steps)], capture_output=True, text=True, check=True, env=env).stdout
ours = {r["k"]: r for r in (json.loads(l) for l in out.splitlines() if l.startswith("{"))}
print(f"preset {a.preset}, batch {a.batch} x ctx {a.ctx} positions, {a.threads} threads, torch {torch.__version__}")
print(f"{'k':>3}{'torch tokens/s':>16}{'patchlm tokens/s':>18}{'ratio':>8}")
for k, tps in rows:
    print(f"{k:>3}{tps:>16.0f}{ours[k]['tokens_per_s']:>18.0f}{ours[k]['tokens_per_s'] / tps:>8.2f}")
