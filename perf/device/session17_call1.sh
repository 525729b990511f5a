#!/usr/bin/env bash
# Seventeenth session, issue 15, first call. On an H200: `bench generate` 1/32 with the transformers
# baselines (perf/results/h200/bench_generate.json), then the 32-row step kernel by kernel with exposed times.
# On an H100 (the GPU tests of this code passed there last session): the exposed-time profile at 1 and 32
# rows, positions 129 and 384, which says where the step's time goes once PDL overlaps the kernels.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
if echo "$gpu" | grep -q H200; then
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=400 BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  LAYERED_BATCHES=32 LAYERED_POS=129,384 LAYERED_TIMEOUT=170 bash perf/device/h200_persistent.sh layered
else
  LAYERED_BATCHES=1,32 LAYERED_POS=129,384 LAYERED_TIMEOUT=300 bash perf/device/h200_persistent.sh layered
fi
