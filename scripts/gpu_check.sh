#!/usr/bin/env bash
# One device call: the CUDA kernels' math against the CPU path, training-step throughput side by
# side with PyTorch on the same GPU, and a bf16 GPU run against the CPU/f32 loss curve.
# Prepare here (no GPU needed):
#   source <cuda toolchain env>          # CUDA 13.0 nvcc + libs (see README)
#   cargo build --release -p xtask --features cuda --target-dir target-cuda
#   cargo test --release -p patchlm-model --features cuda --target-dir target-cuda --test cuda --no-run
#   cargo xtask pretrain --config scripts/gpu_track.toml --out runs/track-cpu   # CPU f32 reference
#   scripts/gpu_check.sh --stage         # strips and packs the binaries and the reference curve into .device/
# then on the device, with .device, data/corpus and data/shards-* carried:
#   bash scripts/gpu_check.sh [kernels] [ours] [gpt2] [plain] [track] [track32] [370m]     (no section = all of them)
# Results go to $OUT (one file per section), a short summary is printed last.
set -u
if [ "${1:-}" = "--stage" ]; then
  mkdir -p .device
  cp target-cuda/release/xtask .device/xtask && strip .device/xtask
  t=$(ls -t target-cuda/release/deps/cuda-* | grep -v '\.d$' | head -1)
  cp "$t" .device/cuda-tests && strip .device/cuda-tests
  gzip -f -6 .device/xtask .device/cuda-tests
  cp runs/track-cpu/metrics.jsonl .device/track-cpu.jsonl
  ls -la .device
  exit 0
fi
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/bin
for b in xtask cuda-tests; do
  [ -x /tmp/bin/$b ] || { gunzip -c .device/$b.gz >/tmp/bin/$b && chmod +x /tmp/bin/$b; }
done
lib=$(find / -name libcublas.so.13 -not -path '/proc/*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "$lib"):${LD_LIBRARY_PATH:-}
export PATCHLM_FUSED_CUDA=1 PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
sections="${*:-kernels gpt2 plain track 370m}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for s in $sections; do
  echo "== $s  ($(date +%T))"
  case $s in
    kernels) timeout 120 /tmp/bin/cuda-tests --ignored --test-threads 1 2>&1 | tee "$OUT/kernels.txt" ;;
    gpt2) timeout 240 python3 bench/compare_model.py --device cuda --dtype bf16 --compile \
            --preset gpt2-small --batch 8 --ctx 1024 --steps 5 --xtask /tmp/bin/xtask 2>&1 | tee "$OUT/bench-gpt2.txt" ;;
    370m) timeout 240 python3 bench/compare_model.py --device cuda --dtype bf16 --compile \
            --preset 370m --batch 4 --ctx 2048 --steps 5 --xtask /tmp/bin/xtask 2>&1 | tee "$OUT/bench-370m.txt" ;;
    ours) for shape in "gpt2-small 8 1024" "370m 4 2048"; do
            set -- $shape
            timeout 120 /tmp/bin/xtask bench model --preset $1 --batch $2 --ctx $3 --k 1,4 --steps 5 \
              --device cuda --dtype bf16 2>&1 | grep '^{' | tee -a "$OUT/ours.txt"
          done ;;
    plain) timeout 90 /tmp/bin/xtask bench model --preset gpt2-small --batch 8 --ctx 1024 --k 1,4 --steps 5 \
             --device cuda --dtype bf16 --fused off 2>&1 | tail -30 | tee "$OUT/plain.txt" ;;
    track|track32)
           dt=bf16; [ $s = track32 ] && dt=f32
           timeout 200 /tmp/bin/xtask pretrain --config scripts/gpu_track.toml --device cuda --dtype $dt \
             --out /tmp/$s --data-dir data 2>&1 | tail -8 | tee "$OUT/$s.txt"
           cp /tmp/$s/metrics.jsonl "$OUT/$s-gpu.jsonl" 2>/dev/null
           python3 scripts/compare_curves.py .device/track-cpu.jsonl /tmp/$s/metrics.jsonl 2>&1 | tee -a "$OUT/$s.txt" ;;
    *) echo "unknown section $s" ;;
  esac
done
echo "== summary  ($(date +%T))"
grep -h "test result\|FAILED\|panicked" "$OUT/kernels.txt" 2>/dev/null
tail -6 "$OUT"/bench-*.txt 2>/dev/null
tail -n3 "$OUT"/track*.txt 2>/dev/null
