#!/usr/bin/env bash
# One call on a 4-GPU host: per-GPU throughput of the 1.1B recipe (fast path, micro-batch 8 × 2048 per GPU,
# synthetic tokens, 50 steps) under FSDP2 settings, to measure 1 -> 2 -> 4 GPU scaling.
#   phase 1: [A] 2 GPUs defaults              | [B] 2 GPUs fsdp_reshard_after_forward=false
#   phase 2: [1] 1 GPU (baseline, GPU 0)      | [C] 2 GPUs reshard false + bf16 gradient reduce
#   phase 3: [D] 4 GPUs reshard false         ; phase 4: [E] 4 GPUs defaults
set -u
source "$(dirname "$0")/pretrain_runs.sh"
OUT=${OUT:-out/fsdp}; W=/tmp/fsdp; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON=("${RECIPE_50[@]}")
RUN_TIMEOUT=300
T0=$(date +%s)
run1 A-2gpu 0,1 2 --train.fsdp_reshard_after_forward true & run1 B-2gpu-keep 2,3 2 --train.fsdp_reshard_after_forward false & wait
echo "phase 2 at $(( $(date +%s) - T0 )) s"
run1 1gpu 0 1 & run1 C-2gpu-keep-bf16reduce 2,3 2 --train.fsdp_reshard_after_forward false --train.fsdp_reduce_dtype bfloat16 & wait
echo "phase 3 at $(( $(date +%s) - T0 )) s"
run1 D-4gpu-keep 0,1,2,3 4 --train.fsdp_reshard_after_forward false
echo "phase 4 at $(( $(date +%s) - T0 )) s"
run1 E-4gpu 0,1,2,3 4 --train.fsdp_reshard_after_forward true
echo "done at $(( $(date +%s) - T0 )) s"
( cd "$W" && tar czf "$OUT/metrics.tgz" */metrics.jsonl 2>/dev/null )
window_table "$W"
for f in "$OUT"/*.log; do echo "--- $f"; grep -E "throughput|Error|error" "$f" | tail -3; done
