"""Causal flash attention's kernels alone, side by side: patchlm (`xtask bench flash`: the forward
as training runs it, log-sum-exp kept, and the backward to dq, dk, dv) and PyTorch's
scaled_dot_product_attention on the same shapes (its FlashAttention-2 backend on CUDA), in one
process tree. TFLOP/s by FlashAttention's count (forward 4*B*H*T^2*d/2 causal, backward 2.5x).
    python3 bench/compare_flash.py --device cuda --dtype bf16 --xtask /tmp/bin/xtask
    python3 bench/compare_flash.py --shapes tiny:2x64 --reps 3          # CPU, any machine
Needs torch; a release build of xtask (with --features cuda for --device cuda)."""
import argparse, contextlib, json, os, subprocess, time
import torch, torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", default="gpt2-small:8x1024,370m:4x2048", help="preset:BATCHxCTX,...")
ap.add_argument("--device", default="cpu"); ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
ap.add_argument("--reps", type=int, default=20); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--xtask", default="target/release/xtask")
a = ap.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)
tdt = torch.bfloat16 if a.dtype == "bf16" else torch.float32

def sync():
    if dev.type == "cuda": torch.cuda.synchronize()

def timed(f):
    """ms per call over a.reps calls between two synchronisations, after one warm-up call."""
    f(); sync(); t0 = time.perf_counter()
    for _ in range(a.reps): f()
    sync()
    return (time.perf_counter() - t0) * 1e3 / a.reps

def flash_backend():
    if dev.type != "cuda": return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

rows = []
for spec in a.shapes.split(","):
    preset, bt = spec.split(":"); b, t = (int(x) for x in bt.split("x"))
    cmd = [a.xtask, "bench", "flash", "--preset", preset, "--batch", str(b), "--ctx", str(t), "--device", a.device,
           "--dtype", a.dtype, "--reps", str(a.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS=str(a.threads)))
    ours = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or len(ours) != 1:
        print(out.stdout, out.stderr); raise SystemExit(f"xtask bench flash failed: {' '.join(cmd)}")
    o = ours[0]; h, hd = o["heads"], o["head_dim"]
    print(f"patchlm {preset} {b}x{t} ({h} heads of {hd}, {o['kernels']} kernels): forward {o['fwd_ms']:.3f} ms "
          f"({o['fwd_tflops']:.3g} TFLOP/s), backward {o['bwd_ms']:.3f} ms ({o['bwd_tflops']:.3g})", flush=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, hd, device=dev, dtype=tdt, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, h, t, hd, device=dev, dtype=tdt)
    flops = 4 * b * h * t * t * hd / 2
    with flash_backend():
        fwd_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        bwd_ms = timed(lambda: torch.autograd.grad(y, (q, k, v), dout, retain_graph=True))
    print(f"torch   {preset} {b}x{t}: forward {fwd_ms:.3f} ms ({flops / fwd_ms / 1e9:.3g} TFLOP/s), backward "
          f"{bwd_ms:.3f} ms ({2.5 * flops / bwd_ms / 1e9:.3g})", flush=True)
    rows.append((f"{preset} {b}x{t}", "forward", o["fwd_ms"], o["fwd_tflops"], fwd_ms, flops / fwd_ms / 1e9))
    rows.append((f"{preset} {b}x{t}", "backward", o["bwd_ms"], o["bwd_tflops"], bwd_ms, 2.5 * flops / bwd_ms / 1e9))
    del q, k, v, dout, y
print(f"causal flash attention, {a.device} {a.dtype}, {a.reps} launches per pass, torch {torch.__version__}; "
      f"ratio = patchlm speed / torch speed")
print(f"{'shape':>18}{'pass':>10}{'patchlm ms':>12}{'TFLOP/s':>9}{'torch ms':>10}{'TFLOP/s':>9}{'ratio':>7}")
for shape, p, ms, tf, tms, ttf in rows:
    print(f"{shape:>18}{p:>10}{ms:>12.3f}{tf:>9.3g}{tms:>10.3f}{ttf:>9.3g}{tms / ms:>7.2f}")
