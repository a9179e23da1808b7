#!/usr/bin/env bash
# One device call: the CUDA kernels' math against the CPU path, then training-step throughput
# side by side with PyTorch on the same GPU. Prepare here (no GPU needed):
#   source <cuda toolchain env>          # CUDA 13.0 nvcc + libs (see README)
#   cargo build --release -p xtask --features cuda --target-dir target-cuda
#   cargo test --release -p patchlm-model --features cuda --target-dir target-cuda --test cuda --no-run
#   cargo xtask pretrain --config scripts/gpu_track.toml --out runs/track-cpu   # CPU f32 reference
#   scripts/gpu_check.sh --stage         # copies the binaries and the reference curve into .device/
# then run `bash scripts/gpu_check.sh` on the device with .device and data/corpus carried; results
# go to $OUT.
set -u
if [ "${1:-}" = "--stage" ]; then
  mkdir -p .device
  cp target-cuda/release/xtask .device/xtask && strip .device/xtask
  t=$(ls -t target-cuda/release/deps/cuda-* | grep -v '\.d$' | head -1)
  cp "$t" .device/cuda-tests && strip .device/cuda-tests
  cp runs/track-cpu/metrics.jsonl .device/track-cpu.jsonl
  ls -la .device
  exit 0
fi
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
lib=$(find / -name libcublas.so.13 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "$lib"):${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "== kernels vs CPU"
PATCHLM_FUSED_CUDA=1 timeout 120 .device/cuda-tests --ignored --test-threads 1 2>&1 | tee "$OUT/kernels.txt"
echo "== throughput (ours vs PyTorch, same GPU)"
for shape in "gpt2-small 8 1024" "370m 4 2048"; do
  set -- $shape
  PATCHLM_FUSED_CUDA=1 timeout 200 python3 bench/compare_model.py --device cuda --dtype bf16 --compile \
    --preset "$1" --batch "$2" --ctx "$3" --steps 5 --xtask .device/xtask 2>&1 | tee "$OUT/bench-$1.txt"
done
echo "== 200 steps on the GPU in bf16 against the CPU f32 curve (same seed, same data)"
PATCHLM_FUSED_CUDA=1 timeout 150 .device/xtask pretrain --config scripts/gpu_track.toml --device cuda --dtype bf16 \
  --out /tmp/track-gpu --data-dir data 2>&1 | tail -8 | tee "$OUT/track.txt"
cp /tmp/track-gpu/metrics.jsonl "$OUT/track-gpu.jsonl" 2>/dev/null
python3 scripts/compare_curves.py .device/track-cpu.jsonl /tmp/track-gpu/metrics.jsonl 2>&1 | tee -a "$OUT/track.txt"
