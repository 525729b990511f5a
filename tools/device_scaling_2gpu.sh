#!/usr/bin/env bash
# One call on a 2-GPU host: 1 -> 2 GPU scaling of the 1.1B recipe's default fast path (fused training blocks)
# against the per-block compiled blocks, and two FSDP2 settings (logs: perf/results/scaling_*_h200x2/).
#   phase 1: [1] fused, GPU 0 | [1] compiled, GPU 1
#   phase 2: [2] fused; [2] compiled; [2] fused with NCCL_MAX_NCHANNELS=8; [2] fused, bf16 gradient reduce
# `device_scaling_2gpu.sh profile`: instead, profile steps 31-32 of a 1-GPU and a 2-GPU run (train.profile_from_step).
set -u
source "$(dirname "$0")/pretrain_runs.sh"
OUT=${OUT:-out/fsdp}; W=/tmp/fsdp2; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON=("${RECIPE_50[@]}")
RUN_TIMEOUT=240
T0=$(date +%s)
if [ "${1:-}" = profile ]; then  # where FSDP2's extra time per step goes: traces of steps 31-32, 1 and 2 GPUs
  run1 1gpu-fused-prof 0 1 --train.profile_from_step 30
  run1 2gpu-fused-prof 0,1 2 --train.profile_from_step 30
  for d in "$W"/*-prof; do
    for f in "$d"/profile/*.txt; do cp "$f" "$OUT/$(basename "$d")_$(basename "$f")"; done
    for f in "$d"/profile/rank0_*.json; do gzip -c "$f" > "$OUT/$(basename "$d")_$(basename "$f").gz"; done
  done
  window_table "$W"
  exit 0
fi
run1 1gpu-fused 0 1 & run1 1gpu-compiled 1 1 --train.kernels.fused_blocks false & wait
run1 2gpu-fused 0,1 2
run1 2gpu-compiled 0,1 2 --train.kernels.fused_blocks false
NCCL_MAX_NCHANNELS=8 run1 2gpu-fused-nch8 0,1 2
run1 2gpu-fused-bf16reduce 0,1 2 --train.fsdp_reduce_dtype bfloat16
echo "done at $(( $(date +%s) - T0 )) s"
window_table "$W"
for f in "$OUT"/*.log; do echo "--- $(basename "$f")"; grep -E "throughput|Error|error" "$f" | tail -3; done
