#!/usr/bin/env bash
# One device call for issue 15's decode numbers, by the card given: on an H200 `bench generate` 1/32 with the
# transformers baselines (perf/results/h200/bench_generate.json), then the GPU tests of the decode step; on an H100
# the tests first, then `bench generate` 1/32 without the transformers rows (time). The session scripts
# (session16_call2.sh, session17_call3.sh, session17_next.sh) call this with the tests and timeouts they ran with.
# Env: TESTS_K (pytest -k), H200_BENCH_TIMEOUT, H200_TEST_TIMEOUT, H100_TEST_TIMEOUT, H100_BENCH_TIMEOUT (s).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
K=${TESTS_K:-"graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or deferred_step_tiles or engine_triton_deferred or l2_prefetch"}
if echo "$gpu" | grep -q H200; then
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=${H200_BENCH_TIMEOUT:-400} BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  TESTS_K="$K" TEST_TIMEOUT=${H200_TEST_TIMEOUT:-150} bash perf/device/h200_persistent.sh tests
else
  TESTS_K="$K" TEST_TIMEOUT=${H100_TEST_TIMEOUT:-180} bash perf/device/h200_persistent.sh tests
  BATCHES=1,32 BENCH_BUDGET=200 BENCH_TIMEOUT=${H100_BENCH_TIMEOUT:-270} BENCH_ARGS="--triton-max-batch 32 --no-hf" bash perf/device/h200_persistent.sh bench
fi
