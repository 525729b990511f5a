#!/usr/bin/env bash
# The next call for issue 15 (~595 s; written in the nineteenth session, not run there). First the GPU tests of
# the bf16 weight copies and the Triton AdamW's explicit-fma fix (60 s). On an H200: `bench generate` 1/32 with
# the transformers baselines (bench_generate.json), then the training GEMMs under cuBLAS and cuBLASLt in one
# process (perf/gemm_shapes.py --blas), then the decode GPU tests. On an H100: the decode tests, the GEMMs, then
# the bench without the transformers rows. Carry .whl.
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
gemm() { echo "-- $(date -u +%H:%M:%S) gemm --blas"; PYTHONPATH=$PWD/src:/tmp/site timeout 45 python3 perf/gemm_shapes.py --blas cublas,cublaslt 2>&1 | grep -v -i warn | tail -24; }
echo "-- $(date -u +%H:%M:%S) weight copies, AdamW, graphed step"
PYTHONPATH=$PWD/src:/tmp/site timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_weight_copies.py \
  tests/test_kernels_adamw.py tests/test_train_graph.py -k "copies or adamw or matches_torch or graphed_step_equals" \
  2>&1 | grep -E "passed|failed|^E |FAILED" | head -12
K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or engine_triton_deferred"
if echo "$gpu" | grep -q H200; then
  echo "GPU: $gpu"
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=400 BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  gemm
  TESTS_K="$K" TEST_TIMEOUT=75 bash perf/device/h200_persistent.sh tests
else
  echo "GPU: $gpu"
  TESTS_K="$K" TEST_TIMEOUT=120 bash perf/device/h200_persistent.sh tests
  gemm
  BATCHES=1,32 BENCH_BUDGET=200 BENCH_TIMEOUT=340 BENCH_ARGS="--triton-max-batch 32 --no-hf" bash perf/device/h200_persistent.sh bench
fi
