#!/usr/bin/env bash
# One device call: the CUDA kernels' math against the CPU path, training-step throughput side by
# side with PyTorch on the same GPU, and a bf16 GPU run against the CPU/f32 loss curve.
# Prepare here (no GPU needed):
#   source <cuda toolchain env>          # CUDA 13.0 nvcc + libs (see docs/gpu.md)
#   cargo build --release -p xtask --features cuda --target-dir target-cuda
#   cargo test --release -p patchlm-model --features cuda --target-dir target-cuda --test cuda --no-run
#   cargo xtask pretrain --config scripts/gpu_track.toml --out runs/track-cpu   # CPU f32 reference
#   scripts/gpu_check.sh --stage         # strips and packs the binaries and the reference curve into .device/
# then on the device, with .device, data/corpus and data/shards-* carried:
#   bash scripts/gpu_check.sh [kernels] [optin] [flash] [gpt2] [370m] [track] [dqa] [variants] [attn] [large] [optin-each] [ops] [ncu] [ours] [events] [plain]
# (no section: kernels variants 370m gpt2 attn track, in order of what matters most should the call's
# time run out: 370M is the shape still behind torch.compile, and its --profile rows split both
# sides' step by kind of work, attention kernels included; attn puts our flash kernels beside
# PyTorch's on their own; track re-checks the loss curve stop 22 found tracking; on an H200 on 2026-12-04, kernels
# optin flash gpt2 track 370m took 559 s, most of it torch.compile's warm-up; every measurement
# is printed as it is made, so a section cut by its timeout keeps them; with little device time
# left, `kernels variants 370m gpt2` in one call and `kernels track` in another; `large`, the
# opt-in head sizes 80/96/128 with their own device tests, when time is left over).
# The switchable kernel families (PATCHLM_LAYOUT_CUDA, PATCHLM_ROWS_CUDA, PATCHLM_BF16_GRADS,
# PATCHLM_DEVICE_CLIP, PATCHLM_FLASH_MMA: on by default since their device tests passed on an H200;
# their math also checked on the CPU by tests/emulated.rs) stay on
# for the sections after `kernels` only when their device tests pass there too (each tensor-core
# flash family's tests run in a process of their own and decide its switch; the others decide
# the rest); `optin` times a training step with them off and on, `flash` flash attention's
# CUDA-core against its tensor-core kernels (and keeps the fastest on).
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
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
sections="${*:-kernels variants 370m gpt2 attn track}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for s in $sections; do
  echo "== $s  ($(date +%T))"
  case $s in
    kernels) # Each tensor-core flash family (mma.sync and its variants, wgmma) in a process of its own (a fault there
             # must not take the others' results with it); each family's switch goes on when its
             # tests pass. The processes run side by side (most of their time is the CPU references
             # and CUDA start-up, and the machine has 16 cores), each with its own time limit.
             tests() {  # tests NAME FILTER...: one process, its output in /tmp/kernels-NAME.txt
               local name=$1; shift
               timeout 240 /tmp/bin/cuda-tests --ignored --test-threads 1 "$@" > /tmp/kernels-$name.txt 2>&1
             }
             tests main --skip _mma_ --skip dq_atomic --skip flash_wide --skip flash_large \
               --skip flash_occ4 --skip hopper --skip flash_wgmma --skip wg_one_pass --skip wg_qreg --skip wg_wide --skip sorted_embedding &
             tests mma _mma_ &
             tests dqa dq_atomic &
             tests wide flash_wide_forward &
             tests wideb flash_wide_backward &
             tests occ4 flash_occ4 &
             # Hopper's warpgroup MMA probe (kernels/hopper.cu): the layouts the wgmma kernels
             # assume; with their own tests it decides PATCHLM_FLASH_WGMMA.
             tests hopper hopper &
             tests wgmma flash_wgmma &
             # The wgmma one-pass backward (PATCHLM_FLASH_WGMMA with PATCHLM_FLASH_DQ_ATOMIC).
             tests wgdq wg_one_pass &
             # The wgmma forward and dq with q in registers (PATCHLM_FLASH_WGMMA_QREG).
             tests wgq wg_qreg &
             # ... and with two warpgroups of 64 rows a block (PATCHLM_FLASH_WIDE with WGMMA).
             tests wgw wg_wide &
             # The embedding backward without float atomics (PATCHLM_EMBEDDING_SORTED).
             tests emb sorted_embedding &
             wait
             # (Each family's output is judged on its own, then kept in kernels.txt: a device call
             # brings back at most 8 files.)
             cat /tmp/kernels-main.txt > "$OUT/kernels.txt"
             for f in mma dqa wide wideb occ4 hopper wgmma wgdq wgq wgw emb; do
               cat /tmp/kernels-$f.txt >> "$OUT/kernels.txt"
             done
             grep -h "test result\|FAILED\|panicked" "$OUT/kernels.txt"
             mma=0; dqa=0; wide=0; wideb=0; occ4=0; wg=0; WGDQ=0; WGQ=0; WGW=0
             grep -q 'test result: ok' /tmp/kernels-mma.txt && mma=1
             grep -q 'test result: ok' /tmp/kernels-dqa.txt && [ $mma = 1 ] && dqa=1
             grep -q 'test result: ok' /tmp/kernels-wide.txt && [ $mma = 1 ] && wide=1
             grep -q 'test result: ok' /tmp/kernels-wideb.txt && [ $mma = 1 ] && wideb=1
             grep -q 'test result: ok' /tmp/kernels-occ4.txt && [ $mma = 1 ] && occ4=1
             # The wgmma kernels where their own test passed: the launcher settles the device's
             # reading of their descriptors by the probes at first use and takes the kernels built
             # for it, so the probe test's verdict on the documented reading (kernels-hopper) is
             # information, not a condition.
             grep -q 'test result: ok' /tmp/kernels-wgmma.txt && [ $mma = 1 ] && wg=1
             grep -q 'test result: ok' /tmp/kernels-wgdq.txt && [ $wg = 1 ] && [ $dqa = 1 ] && WGDQ=1
             grep -q 'test result: ok' /tmp/kernels-wgq.txt && [ $wg = 1 ] && WGQ=1
             grep -q 'test result: ok' /tmp/kernels-wgw.txt && [ $wg = 1 ] && WGW=1
             EMB_SORTED=0; grep -q 'test result: ok' /tmp/kernels-emb.txt && EMB_SORTED=1
             if grep -m1 'test result' "$OUT/kernels.txt" | grep -q ok; then
               export PATCHLM_LAYOUT_CUDA=${PATCHLM_LAYOUT_CUDA:-1} PATCHLM_ROWS_CUDA=${PATCHLM_ROWS_CUDA:-1} \
                 PATCHLM_BF16_GRADS=${PATCHLM_BF16_GRADS:-1} PATCHLM_DEVICE_CLIP=${PATCHLM_DEVICE_CLIP:-1}
             else
               # The families on by default go off explicitly when their device tests fail.
               export PATCHLM_LAYOUT_CUDA=0 PATCHLM_ROWS_CUDA=0 PATCHLM_BF16_GRADS=0 PATCHLM_DEVICE_CLIP=0 \
                 PATCHLM_ATTENTION_CHUNKS=${PATCHLM_ATTENTION_CHUNKS:-1}
               mma=0; dqa=0; wide=0; wideb=0; occ4=0; wg=0; WGDQ=0; WGQ=0; WGW=0
               echo "device tests failed: the switchable kernel families go off, attention in one block"
             fi
             export PATCHLM_FLASH_MMA=${PATCHLM_FLASH_MMA:-$mma}
             # dq, dk and dv in one backward pass: opt-in, on for the sections that follow only
             # where its tests pass (the dqa section times it off and on).
             # (With the wgmma kernels on, the one pass runs on them: only where their one-pass
             # test passed too; DQA_OK keeps the mma.sync one pass's verdict for `variants`.)
             DQA_OK=$dqa
             [ $wg = 1 ] && [ $WGDQ = 0 ] && dqa=0
             export PATCHLM_FLASH_DQ_ATOMIC=${PATCHLM_FLASH_DQ_ATOMIC:-$dqa}
             # The wide forward (128 rows a block) and backward (128 keys): the same. (With the
             # wgmma kernels on, the switches pick their two-warpgroup forward, dq and dk/dv: only
             # where their test passed too; WIDE_OK and WIDEB_OK keep the mma.sync verdicts for
             # `variants`.)
             WIDE_OK=$wide; WIDEB_OK=$wideb
             [ $wg = 1 ] && [ $WGW = 0 ] && wide=0 && wideb=0
             export PATCHLM_FLASH_WIDE=${PATCHLM_FLASH_WIDE:-$wide} PATCHLM_FLASH_WIDE_BWD=${PATCHLM_FLASH_WIDE_BWD:-$wideb}
             # dq at four blocks an SM: the same.
             export PATCHLM_FLASH_OCC4=${PATCHLM_FLASH_OCC4:-$occ4} PATCHLM_FLASH_WGMMA=${PATCHLM_FLASH_WGMMA:-$wg}
             echo "kernel families: layout ${PATCHLM_LAYOUT_CUDA:-0}, rows ${PATCHLM_ROWS_CUDA:-0}," \
               "bf16 gradients ${PATCHLM_BF16_GRADS:-0}, device clip ${PATCHLM_DEVICE_CLIP:-0}," \
               "mma flash $PATCHLM_FLASH_MMA, one-pass flash backward $PATCHLM_FLASH_DQ_ATOMIC," \
               "wide flash forward $PATCHLM_FLASH_WIDE, wide flash backward $PATCHLM_FLASH_WIDE_BWD," \
               "four-block flash dq $PATCHLM_FLASH_OCC4, wgmma flash $PATCHLM_FLASH_WGMMA" \
               "(its one-pass backward: $WGDQ, q in registers: $WGQ, two warpgroups: $WGW)" ;;
    optin) # The switchable families off, on, and on with the memory pool handing freed memory back at every
           # synchronisation (the driver's default, PATCHLM_CUDA_POOL_RELEASE=1): its host cost.
           for run in 0:0 1:0 1:1; do
             on=${run%:*}; rel=${run#*:}
             PATCHLM_CUDA_POOL_RELEASE=$rel PATCHLM_LAYOUT_CUDA=$on PATCHLM_ROWS_CUDA=$on PATCHLM_BF16_GRADS=$on \
               PATCHLM_DEVICE_CLIP=$on \
               timeout 90 /tmp/bin/xtask bench model --preset gpt2-small \
               --batch 8 --ctx 1024 --k 1 --steps 5 --device cuda --dtype bf16 2>&1 | grep '^{' \
               | sed "s/^{/{\"optin_kernels\": $on, \"pool_release\": $rel, /" | tee -a "$OUT/optin.txt"
           done ;;
    flash) # Flash attention's kernel families side by side (softmax attention is in the optin
           # rows): CUDA cores, then each tensor-core family that passed its tests, on the
           # GPT-2-small shape (FLASH_SHAPES="gpt2-small 8 1024;370m 4 2048" adds 370M). The fastest
           # stays on for the sections after this one (the gpt2 and 370m sections time it).
           fams="cuda"
           [ "${PATCHLM_FLASH_MMA:-0}" = 1 ] && fams="$fams mma"
           IFS=';' read -ra shapes <<< "${FLASH_SHAPES:-gpt2-small 8 1024}"
           for shape in "${shapes[@]}"; do
             set -- $shape
             for fam in $fams; do
               m=0; [ $fam = mma ] && m=1
               PATCHLM_FLASH_MMA=$m timeout 90 /tmp/bin/xtask bench model --preset $1 --batch $2 \
                 --ctx $3 --k 1 --steps 5 --device cuda --dtype bf16 --attention flash 2>&1 | grep '^{' \
                 | sed "s/^{/{\"flash_family\": \"$fam\", /" | tee -a "$OUT/flash.txt"
             done
           done
           best=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("preset") == "gpt2-small"]
print(max(rows, key=lambda r: r["tokens_per_s"])["flash_family"] if rows else "")' "$OUT/flash.txt" 2>/dev/null)
           if [ -n "$best" ]; then
             export PATCHLM_FLASH_MMA=0
             [ "$best" = mma ] && export PATCHLM_FLASH_MMA=1
             echo "fastest flash attention on gpt2-small: $best (kept for the sections that follow)"
           fi ;;
    optin-each)
           # Each switchable family alone (layout, rows, bf16 gradients, device clip), to attribute the
           # optin gain.
           for on in "1 0 0 0" "0 1 0 0" "0 0 1 0" "0 0 0 1"; do
             set -- $on
             PATCHLM_LAYOUT_CUDA=$1 PATCHLM_ROWS_CUDA=$2 PATCHLM_BF16_GRADS=$3 PATCHLM_DEVICE_CLIP=$4 \
               timeout 90 /tmp/bin/xtask bench model \
               --preset gpt2-small --batch 8 --ctx 1024 --k 1 --steps 5 --device cuda --dtype bf16 2>&1 | grep '^{' \
               | tee -a "$OUT/optin-each.txt"
           done ;;
    ncu)   # Time per kernel over 3 training steps (2 warm-up + 1) with Nsight Compute, where it is installed.
           ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
           [ -n "$ncu" ] && timeout 150 "$ncu" --metrics gpu__time_duration.sum --print-summary per-kernel \
             /tmp/bin/xtask bench model --preset gpt2-small --batch 8 --ctx 1024 --k 1 --steps 1 --device cuda \
             --dtype bf16 > "$OUT/ncu.txt" 2>&1 && python3 scripts/ncu_summary.py "$OUT/ncu.txt" | head -40 ;;
    # Both shapes side by side with PyTorch; --profile adds one step of each timed by kind of work
    # (matmul, attention forward / backward, optimizer, the rest): where the gap is. PyTorch runs
    # the token phase only (the patch-phase target is against our own token phase; each K costs
    # torch.compile a warm-up of about a minute).
    gpt2) timeout 300 python3 bench/compare_model.py --device cuda --dtype bf16 --compile --attention both \
            --backward tape --preset gpt2-small --batch 8 --ctx 1024 --steps 5 --profile --torch-ks 1 --xtask /tmp/bin/xtask \
            2>&1 | tee "$OUT/bench-gpt2.txt" ;;
    370m) timeout 300 python3 bench/compare_model.py --device cuda --dtype bf16 --compile --attention both \
            --backward tape --preset 370m --batch 4 --ctx 2048 --steps 5 --profile --torch-ks 1 --xtask /tmp/bin/xtask \
            2>&1 | tee "$OUT/bench-370m.txt" ;;
    dqa)  # Flash attention's backward as two passes (dq; dk and dv) and as one (dq summed in f32
          # atomics, PATCHLM_FLASH_DQ_ATOMIC), a training step and the kernels alone, both shapes;
          # the faster on 370M stays on for the sections that follow.
          if [ "${PATCHLM_FLASH_DQ_ATOMIC:-0}" != 1 ]; then echo "one-pass backward off (its tests did not pass)"; continue; fi
          for shape in "gpt2-small 8 1024" "370m 4 2048"; do
            set -- $shape
            for on in 0 1; do
              PATCHLM_FLASH_DQ_ATOMIC=$on timeout 90 /tmp/bin/xtask bench model --preset $1 --batch $2 --ctx $3 \
                --k 1 --steps 5 --device cuda --dtype bf16 --attention auto 2>&1 | grep '^{' \
                | sed "s/^{/{\"dq_atomic\": $on, /" | tee -a "$OUT/dqa.txt"
              PATCHLM_FLASH_DQ_ATOMIC=$on timeout 60 /tmp/bin/xtask bench flash --preset $1 --batch $2 --ctx $3 \
                --device cuda --dtype bf16 2>&1 | grep '^{' | tee -a "$OUT/dqa.txt"
            done
          done
          best=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("preset") == "370m" and r.get("bench") == "model"]
print(max(rows, key=lambda r: r["tokens_per_s"])["dq_atomic"] if rows else 0)' "$OUT/dqa.txt" 2>/dev/null)
          export PATCHLM_FLASH_DQ_ATOMIC=${best:-0}
          echo "one-pass flash backward: $PATCHLM_FLASH_DQ_ATOMIC (the faster on 370m, kept for the sections that follow)" ;;
    variants)
          # Flash attention's kernel variants that passed their tests, the kernels alone on 370M
          # (`bench flash`), as WIDE:WIDE_BWD:DQ_ATOMIC:OCC4:WGMMA: the forward and dq pass with 64 or 128
          # query rows a block (PATCHLM_FLASH_WIDE), the dk/dv pass with 64 or 128 keys a block
          # (PATCHLM_FLASH_WIDE_BWD), the backward in two passes or one (PATCHLM_FLASH_DQ_ATOMIC),
          # the 64-row dq pass at three or four blocks an SM (PATCHLM_FLASH_OCC4), the forward, dq
          # and dk/dv on warpgroup MMAs (PATCHLM_FLASH_WGMMA; not with the wide or four-block kernels;
          # with the one pass, the wgmma one pass, where its own test passed; with WIDE and
          # WIDE_BWD, their two-warpgroup forward and dq, and dk/dv (not the one pass), where their
          # test passed; WGMMA 2: with the forward and dq holding q in registers,
          # PATCHLM_FLASH_WGMMA_QREG, where its test passed).
          # The fastest (forward + backward) stays on for the sections that follow if a 370M
          # training step with it is faster than one with the defaults.
          fws="0"; [ "${WIDE_OK:-${PATCHLM_FLASH_WIDE:-0}}" = 1 ] || [ "${WGW:-0}" = 1 ] && fws="0 1"
          bws="0"; [ "${WIDEB_OK:-${PATCHLM_FLASH_WIDE_BWD:-0}}" = 1 ] || [ "${WGW:-0}" = 1 ] && bws="0 1"
          dqs="0"; [ "${DQA_OK:-${PATCHLM_FLASH_DQ_ATOMIC:-0}}" = 1 ] && dqs="0 1"
          ocs="0"; [ "${PATCHLM_FLASH_OCC4:-0}" = 1 ] && ocs="0 1"
          wgs="0"; [ "${PATCHLM_FLASH_WGMMA:-0}" = 1 ] && wgs="0 1" && [ "${WGQ:-0}" = 1 ] && wgs="0 1 2"
          list=""
          for f in $fws; do for b in $bws; do for d in $dqs; do for o in $ocs; do for g in $wgs; do
            [ $f = 1 ] && [ $o = 1 ] && continue  # (the wide kernels have no four-block build)
            [ $d = 1 ] && [ $o = 1 ] && continue  # (the one pass has no dq pass to run at four blocks)
            [ $g != 0 ] && [ $o = 1 ] && continue  # (no four-block wgmma build)
            [ $g != 0 ] && [ $b$d = 11 ] && continue  # (nor a wide wgmma one pass)
            [ $g = 0 ] && [ $f = 1 ] && [ "${WIDE_OK:-${PATCHLM_FLASH_WIDE:-0}}" != 1 ] && continue
            [ $g = 0 ] && [ $b = 1 ] && [ "${WIDEB_OK:-${PATCHLM_FLASH_WIDE_BWD:-0}}" != 1 ] && continue
            [ $g != 0 ] && [ $f$b != 00 ] && [ "${WGW:-0}" != 1 ] && continue
            [ $g != 0 ] && [ $d = 1 ] && [ "${WGDQ:-0}" != 1 ] && continue
            list="${list:+$list,}$f:$b:$d:$o:$g"
          done; done; done; done; done
          # (All in one process: no CUDA start-up and module load per variant.)
          echo "flash variants: $list"
          timeout 240 /tmp/bin/xtask bench flash --preset 370m --batch 4 --ctx 2048 --device cuda --dtype bf16 \
            --variants "$list" 2>&1 | grep '^{' | tee -a "$OUT/variants.txt"
          best=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("bench") == "flash"]
print(min(rows, key=lambda r: r["fwd_ms"] + r["bwd_ms"])["config"] if rows else "0:0:0:0:0")' "$OUT/variants.txt" 2>/dev/null)
          best=${best:-0:0:0:0:0}
          for c in 0:0:0:0:0 $best; do
            IFS=: read -r f b d o g <<< "$c"
            PATCHLM_FLASH_WIDE=$f PATCHLM_FLASH_WIDE_BWD=$b PATCHLM_FLASH_DQ_ATOMIC=$d PATCHLM_FLASH_OCC4=$o \
              PATCHLM_FLASH_WGMMA=$((g > 0)) PATCHLM_FLASH_WGMMA_QREG=$((g == 2)) timeout 90 /tmp/bin/xtask bench model --preset 370m --batch 4 --ctx 2048 --k 1 --steps 5 --device cuda \
              --dtype bf16 --attention auto 2>&1 | grep '^{' | sed "s/^{/{\"config\": \"$c\", /" \
              | tee -a "$OUT/variants.txt"
            [ "$best" = 0:0:0:0:0 ] && break
          done
          # Kept only if the training step agrees (the kernels alone can mislead).
          best=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("bench") == "model"]
print(max(rows, key=lambda r: r["tokens_per_s"])["config"] if rows else "0:0:0:0:0")' "$OUT/variants.txt" 2>/dev/null)
          best=${best:-0:0:0:0:0}
          IFS=: read -r f b d o g <<< "$best"
          export PATCHLM_FLASH_WIDE=$f PATCHLM_FLASH_WIDE_BWD=$b PATCHLM_FLASH_DQ_ATOMIC=$d PATCHLM_FLASH_OCC4=$o \
            PATCHLM_FLASH_WGMMA=$((g > 0)) PATCHLM_FLASH_WGMMA_QREG=$((g == 2))
          echo "flash variant (wide, wide backward, one-pass backward, four blocks, wgmma [2: q in registers]): $best" \
            "(kept for the sections that follow)"
          # The same step with cuBLAS on its default workspace pool instead of the 32 MiB one
          # parse_device gives it (PATCHLM_CUBLAS_WORKSPACE=0); the faster setting stays.
          PATCHLM_CUBLAS_WORKSPACE=0 timeout 90 /tmp/bin/xtask bench model --preset 370m --batch 4 --ctx 2048 --k 1 \
            --steps 5 --device cuda --dtype bf16 --attention auto 2>&1 | grep '^{' \
            | sed "s/^{/{\"config\": \"$best\", \"cublas_workspace\": 0, /" | tee -a "$OUT/variants.txt"
          ws=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("bench") == "model" and r["config"] == sys.argv[2]]
off = [r["tokens_per_s"] for r in rows if r.get("cublas_workspace") == 0]
on = [r["tokens_per_s"] for r in rows if r.get("cublas_workspace") != 0]
print(0 if off and on and max(off) > max(on) else 1)' "$OUT/variants.txt" "$best" 2>/dev/null)
          export PATCHLM_CUBLAS_WORKSPACE=${ws:-1}
          echo "cuBLAS 32 MiB workspace: $PATCHLM_CUBLAS_WORKSPACE (kept for the sections that follow)"
          # The embedding backward with float atomics and grouped by id (PATCHLM_EMBEDDING_SORTED,
          # where its test passed), GPT-2-small token and patch phase: the patch phase, four times
          # the tokens a step, is where it shows; the faster patch phase keeps its setting. The rows
          # carry one profiled step by span (the K=4 step against K=1 even if `gpt2` is cut).
          if [ "${EMB_SORTED:-0}" = 1 ]; then
            for e in 0 1; do
              PATCHLM_EMBEDDING_SORTED=$e timeout 90 /tmp/bin/xtask bench model --preset gpt2-small --batch 8 --ctx 1024 \
                --k 1,4 --steps 5 --device cuda --dtype bf16 --attention auto --profile 2>&1 | grep '^{' \
                | sed "s/^{/{\"embedding_sorted\": $e, /" | tee -a "$OUT/variants.txt"
            done
            emb=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if "embedding_sorted" in r and r.get("k") == 4]
print(max(rows, key=lambda r: r["tokens_per_s"])["embedding_sorted"] if rows else 0)' "$OUT/variants.txt" 2>/dev/null)
            export PATCHLM_EMBEDDING_SORTED=${emb:-0}
            echo "embedding backward grouped by id: $PATCHLM_EMBEDDING_SORTED (kept for the sections that follow)"
          fi ;;
    large) # The mma.sync kernels at head sizes 80, 96 and 128 (PATCHLM_FLASH_MMA_LARGE_HEADS): their
           # device tests in a process of their own, then, where they pass, the 780M (96), 1.3B
           # (128) and 2.7B (80) presets: flash attention's kernels alone, and a training step
           # with flash attention against one with softmax attention.
           timeout 120 /tmp/bin/cuda-tests --ignored --test-threads 1 flash_large 2>&1 | tee "$OUT/large.txt"
           grep -q 'test result: ok' "$OUT/large.txt" || { echo "mma flash at 80/96/128: device tests failed"; continue; }
           export PATCHLM_FLASH_MMA_LARGE_HEADS=1
           for shape in "780m 4 2048" "1.3b 2 2048" "2.7b 1 2048"; do
             set -- $shape
             timeout 60 /tmp/bin/xtask bench flash --preset $1 --batch $2 --ctx $3 --device cuda --dtype bf16 2>&1 \
               | grep '^{' | tee -a "$OUT/large.txt"
             timeout 120 /tmp/bin/xtask bench model --preset $1 --batch $2 --ctx $3 --k 1 --steps 3 --device cuda \
               --dtype bf16 --attention both 2>&1 | grep '^{' | tee -a "$OUT/large.txt"
           done ;;
    attn) # Flash attention's kernels alone (forward with the log-sum-exp, backward) beside PyTorch's
          # SDPA flash kernel on both shapes: TFLOP/s of each pass and the ratio.
          timeout 120 python3 bench/compare_flash.py --device cuda --dtype bf16 --xtask /tmp/bin/xtask 2>&1 \
            | tee "$OUT/attn.txt" ;;
    ops) timeout 120 /tmp/bin/xtask bench ops --preset gpt2-small --batch 8 --ctx 1024 --device cuda --dtype bf16 \
           2>&1 | grep '^{' | tee "$OUT/ops.txt" ;;
    ours) for shape in "gpt2-small 8 1024" "370m 4 2048"; do
            set -- $shape
            timeout 120 /tmp/bin/xtask bench model --preset $1 --batch $2 --ctx $3 --k 1,4 --steps 5 \
              --device cuda --dtype bf16 --attention both --backward both 2>&1 | grep '^{' | tee -a "$OUT/ours.txt"
          done ;;
    events)
           # cudarc's per-buffer CUDA events (off by default, PATCHLM_CUDA_EVENTS=1 keeps them):
           # what they cost per step.
           for ev in 1 0; do
             PATCHLM_CUDA_EVENTS=$ev timeout 90 /tmp/bin/xtask bench model --preset gpt2-small --batch 8 --ctx 1024 \
               --k 1 --steps 5 --device cuda --dtype bf16 --backward both 2>&1 | grep '^{' | sed "s/^{/{\"events\": $ev, /" \
               | tee -a "$OUT/events.txt"
           done ;;
    plain) timeout 90 /tmp/bin/xtask bench model --preset gpt2-small --batch 8 --ctx 1024 --k 1,4 --steps 5 \
             --device cuda --dtype bf16 --fused off 2>&1 | grep -v '^ *[0-9]*: \|^ *at ' | tail -8 | tee "$OUT/plain.txt" ;;
    track)
           # GPU f32 (TF32 matmuls) first: its deviation from the CPU f32 curve is the noise
           # floor of changing the arithmetic; then bf16 with each attention kernel.
           for run in f32:0 bf16:0 bf16:1; do
             dt=${run%:*}; fl=${run#*:}; name=track-$dt-flash$fl
             PATCHLM_FLASH_ATTENTION=$fl timeout 60 /tmp/bin/xtask pretrain --config scripts/gpu_track.toml \
               --device cuda --dtype $dt --out /tmp/$name --data-dir data 2>&1 | tail -8 > "$OUT/$name.txt"
             tail -3 "$OUT/$name.txt"
             cp /tmp/$name/metrics.jsonl "$OUT/$name.jsonl" 2>/dev/null
             noise="--measure-only"; [ $dt = bf16 ] && noise="--noise /tmp/track-f32-flash0/metrics.jsonl"
             python3 scripts/compare_curves.py .device/track-cpu.jsonl /tmp/$name/metrics.jsonl $noise 2>&1 | tee -a "$OUT/$name.txt"
           done ;;
    *) echo "unknown section $s" ;;
  esac
done
echo "== summary  ($(date +%T))"
grep -h "test result\|FAILED\|panicked" "$OUT/kernels.txt" 2>/dev/null
# Against torch.compile with our flash rows: the ratio rows, then one step by kind of work.
for f in "$OUT"/bench-*.txt; do
  [ -f "$f" ] && { echo "-- $f"; grep -E '^ +compile' "$f" | grep -v softmax; grep 'flash/tape k=4 against k=1' "$f"; }
  # Our patch phase against our token phase (target: at least 0.95 K).
  [ -f "$f" ] && python3 - "$f" <<'PY' 2>/dev/null
import re, sys
tps = {}
for line in open(sys.argv[1]):
    m = re.match(r"patchlm flash tape k=(\d+): (\d+) tok/s", line)
    if m:
        tps[int(m.group(1))] = int(m.group(2))
for k in sorted(tps):
    if k > 1 and 1 in tps:
        print(f"patch phase K={k}: {tps[k] / tps[1]:.2f}x our token phase (target {0.95 * k:.2f}x)")
PY
done
tail -5 "$OUT/attn.txt" 2>/dev/null
grep -h '"bench":"model"' "$OUT/dqa.txt" 2>/dev/null | python3 -c '
import json, sys
for r in map(json.loads, sys.stdin):
    print("one-pass backward %s: %s %.0f tok/s" % (r["dq_atomic"], r["preset"], r["tokens_per_s"]))' 2>/dev/null
grep -h '"bench"' "$OUT/variants.txt" 2>/dev/null | python3 -c '
import json, sys
for r in map(json.loads, sys.stdin):
    if "embedding_sorted" in r:
        print("embedding backward grouped by id %s: %s k=%s step %.2f ms, %.0f tok/s" % (r["embedding_sorted"],
            r["preset"], r["k"], r["step_ms"], r["tokens_per_s"]))
    elif r["bench"] == "model":
        print("flash variant %s%s: %s step %.0f tok/s" % (r["config"],
            ", cuBLAS default workspace" if r.get("cublas_workspace") == 0 else "", r["preset"], r["tokens_per_s"]))
    else:
        print("flash variant %s: %s forward %.3f ms (%.0f TFLOP/s), backward %.3f ms (%.0f TFLOP/s)" % (
            r["config"], r["preset"], r["fwd_ms"], r["fwd_tflops"], r["bwd_ms"], r["bwd_tflops"]))' 2>/dev/null
# Our K=4 step against K=1 by span, from the embedding A/B rows of `variants`.
python3 - "$OUT/variants.txt" <<'PY' 2>/dev/null
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if "embedding_sorted" in r and "profile" in r]
for e in sorted({r["embedding_sorted"] for r in rows}):
    by_k = {r["k"]: r for r in rows if r["embedding_sorted"] == e}
    if 1 in by_k and 4 in by_k:
        a, b = by_k[1]["profile"], by_k[4]["profile"]
        names = sorted(set(a) | set(b), key=lambda n: -abs(b.get(n, 0.0) - a.get(n, 0.0)))
        print(f"embedding grouped by id {e}: K=4 step {by_k[4]['profile_step_ms']:.2f} ms against K=1 "
              f"{by_k[1]['profile_step_ms']:.2f}; by span: "
              + ", ".join(f"{n} {b.get(n, 0.0) - a.get(n, 0.0):+.3f}" for n in names[:6]))
PY
tail -qn1 "$OUT"/track*.txt 2>/dev/null
# At most 8 files come back from a device call: the loss curves travel as one archive.
(cd "$OUT" && ls track-* >/dev/null 2>&1 && tar czf tracks.tgz track-* && rm -f track-*)
