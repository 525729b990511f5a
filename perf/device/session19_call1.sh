#!/usr/bin/env bash
# Nineteenth session's first call (~590 s). On an H200: `bench generate` 1/32 with the transformers baselines
# (bench_generate.json), then the training GEMMs under cuBLAS and cuBLASLt in one process
# (perf/gemm_shapes.py --blas), then the decode GPU tests (every attention candidate, 1x512/w16 included). On an
# H100: the tests, the GEMMs, then the bench without the transformers rows. Carry .whl.
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
gemm() { echo "-- $(date -u +%H:%M:%S) gemm --blas"; PYTHONPATH=$PWD/src timeout 45 python3 perf/gemm_shapes.py --blas cublas,cublaslt 2>&1 | grep -v -i warn | tail -24; }
K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or engine_triton_deferred"
if echo "$gpu" | grep -q H200; then
  echo "GPU: $gpu"
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=430 BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  gemm
  TESTS_K="$K" TEST_TIMEOUT=90 bash perf/device/h200_persistent.sh tests
else
  echo "GPU: $gpu"
  TESTS_K="$K" TEST_TIMEOUT=120 bash perf/device/h200_persistent.sh tests
  gemm
  BATCHES=1,32 BENCH_BUDGET=200 BENCH_TIMEOUT=380 BENCH_ARGS="--triton-max-batch 32 --no-hf" bash perf/device/h200_persistent.sh bench
fi
