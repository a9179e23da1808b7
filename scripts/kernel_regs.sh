#!/usr/bin/env bash
# Registers, spills and static shared memory of every CUDA kernel as the driver will build it:
# each module compiled to PTX exactly as crates/model/build.rs does (-O3 -std=c++17
# --use_fast_math), then assembled by ptxas for the GPU it targets (fused.cu and flash.cu for
# sm_90, hopper.cu for sm_90a; an H100/H200 JIT-compiles the same PTX). No GPU needed, only
# nvcc and ptxas on PATH, as the `cuda` feature's build needs them (docs/gpu.md).
#
#   bash scripts/kernel_regs.sh [MODULE] [FILTER]   e.g. bash scripts/kernel_regs.sh hopper flash_wg
#
# Prints one line a kernel: name, registers a thread, spill stores / loads (bytes), static shared
# memory (bytes).
set -euo pipefail
cd "$(dirname "$0")/../crates/model/kernels"
mods=${1:-"fused flash hopper"}
filter=${2:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for m in $mods; do
  if [ "$m" = hopper ]; then arch=90a; else arch=90; fi
  nvcc --ptx -O3 -std=c++17 --use_fast_math -arch=compute_$arch -o "$tmp/$m.ptx" "$m.cu"
  ptxas -arch=sm_$arch -O3 -v -o "$tmp/$m.cubin" "$tmp/$m.ptx" 2>&1 | awk -v f="$filter" '
    /Compiling entry function/ { match($0, /function .[A-Za-z0-9_]+/); name = substr($0, RSTART + 10, RLENGTH - 10) }
    /spill stores/ { match($0, /[0-9]+ bytes spill stores/); st = substr($0, RSTART, RLENGTH) + 0
                     match($0, /[0-9]+ bytes spill loads/); ld = substr($0, RSTART, RLENGTH) + 0 }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); r = substr($0, RSTART + 5, RLENGTH - 5)
                              sm = 0; if (match($0, /[0-9]+ bytes smem/)) sm = substr($0, RSTART, RLENGTH) + 0
                              if (f == "" || index(name, f)) printf "%-40s %4d regs  spill %d/%d  smem %d\n", name, r, st, ld, sm }'
done
