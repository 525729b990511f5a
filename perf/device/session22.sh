#!/usr/bin/env bash
# Next session's calls (written in the twenty-first). Carry .whl. Parts, in the order to run them:
#   tests    the GPU tests of the twenty-first session's changes (~150 s): the kept tuning taken by a new
#            process without timing; the transformers rows' compile flags; the tuning store
#   prefill  where the 32-row prefill's 14.7 ms go (perf/prefill_profile.py, ~90 s on a fresh machine)
#   final    `bench generate` 1/32 with the transformers rows (now: static cache uncompiled, and compiled by
#            transformers), for perf/results/h200/bench_generate.json (~380 s on a fresh machine)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
for part in "$@"; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  tests)
    timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_tuning_store.py \
      tests/test_bench_generate.py "tests/test_kernels_decode.py::test_a_new_process_takes_the_kept_tuning_without_timing_cuda" 2>&1 \
      | grep -E "passed|failed|^E |FAILED|Error" | head -20 ;;
  prefill)
    timeout ${PREFILL_TIMEOUT:-200} python3 perf/prefill_profile.py --rows 32 --out $OUT/prefill_profile.json 2>&1 \
      | grep -v -i "warn" | tail -30 ;;
  final)
    BATCHES=1,32 BENCH_BUDGET=${BENCH_BUDGET:-430} BENCH_TIMEOUT=${BENCH_TIMEOUT:-540} BENCH_ARGS="--triton-max-batch 32 --no-torch-step" \
      bash perf/device/h200_persistent.sh bench | grep -v "^  File\|^    \|^-- .* done" ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
