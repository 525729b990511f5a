#!/usr/bin/env bash
# Next session (written in the seventeenth), issue 15, after the 8-warp attention candidates, narrow gate/up tiles and the attention chosen
# in the whole step landed: on an H200 `bench generate` 1/32 with the
# transformers baselines (perf/results/h200/bench_generate.json), then the GPU tests; on an H100 the GPU tests
# of the steps that use PDL first, then `bench generate` 1/32 without the transformers rows (time).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or deferred_step_tiles or engine_triton_deferred or l2_prefetch"
if echo "$gpu" | grep -q H200; then
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=450 BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  TESTS_K="$K" TEST_TIMEOUT=100 bash perf/device/h200_persistent.sh tests
else
  TESTS_K="$K" TEST_TIMEOUT=150 bash perf/device/h200_persistent.sh tests
  BATCHES=1,32 BENCH_BUDGET=200 BENCH_TIMEOUT=420 BENCH_ARGS="--triton-max-batch 32 --no-hf" bash perf/device/h200_persistent.sh bench
fi
