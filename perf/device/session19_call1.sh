#!/usr/bin/env bash
# The next call for issue 15 (~590 s; written in the nineteenth session, not run there). First the GPU tests of
# the bf16 weight copies and the Triton AdamW's explicit-fma fix (60 s), then the training GEMMs under cuBLAS and
# cuBLASLt in one process (perf/gemm_shapes.py --blas, 45 s), then bench_or_tests_by_card.sh: on an H200 `bench
# generate` 1/32 with the transformers baselines (bench_generate.json) and the decode GPU tests; on an H100 the
# tests and the bench without the transformers rows. Carry .whl.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
echo "-- $(date -u +%H:%M:%S) weight copies, AdamW, graphed step"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_weight_copies.py tests/test_kernels_adamw.py \
  tests/test_train_graph.py -k "copies or adamw or matches_torch or graphed_step_equals" 2>&1 \
  | grep -E "passed|failed|^E |FAILED" | head -12
echo "-- $(date -u +%H:%M:%S) gemm --blas"
timeout 45 python3 perf/gemm_shapes.py --blas cublas,cublaslt 2>&1 | grep -v -i warn | tail -24
TESTS_K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or engine_triton_deferred" \
  H200_BENCH_TIMEOUT=380 H200_TEST_TIMEOUT=75 H100_TEST_TIMEOUT=110 H100_BENCH_TIMEOUT=290 \
  exec bash perf/device/bench_or_tests_by_card.sh
