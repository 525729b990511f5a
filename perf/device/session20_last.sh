#!/usr/bin/env bash
# Twentieth session's last call (~320 s). On an H200: `bench generate` 1/32 with the transformers rows, without the
# torch.compile'd step beside the Triton step (--no-torch-step: the rows the goals count, in the time left), for
# perf/results/h200/bench_generate.json. On an H100: the GPU tests of this session's changes instead (the
# pretrain run with compute_copies unset, bench generate --no-torch-step, the weight-copy tests). Carry .whl.
set -u
source perf/device/setup.sh
if echo "$gpu" | grep -q H200; then
  BATCHES=1,32 BENCH_BUDGET=250 BENCH_TIMEOUT=${BENCH_TIMEOUT:-310} BENCH_ARGS="--triton-max-batch 32 --no-torch-step" \
    bash perf/device/h200_persistent.sh bench
else
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_bench_generate.py \
    tests/test_kernels_weight_copies.py tests/test_train_graph.py -k "copies or torch_step" 2>&1 \
    | grep -E "passed|failed|^E |FAILED|Error" | head -12
fi
echo "-- $(date -u +%H:%M:%S) done"
