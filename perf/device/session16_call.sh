#!/usr/bin/env bash
# Sixteenth session's calls (issue 15). Branches on the card the call was given: on an H200 `bench generate`
# batches 1 and 32 (for perf/results/h200/bench_generate.json); on an H100 the parts named in $H100_PARTS:
#   layered32 the 32-row step kernel by kernel at positions 129 and 384, tiles tuned
#   untuned   the untuned step at 1 and 32 rows (the fifteenth session's shared-memory fix, never run on a GPU)
#   tests     the decode kernels' GPU tests named by TESTS_K
#   layered1  the batch-1 step kernel by kernel at positions 129 and 384, tiles tuned
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
if echo "$gpu" | grep -q H200; then
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=430 BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  exit
fi
for part in ${H100_PARTS:-layered32 untuned}; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  layered32) LAYERED_BATCHES=32 LAYERED_POS=129,384 LAYERED_TIMEOUT=360 bash perf/device/h200_persistent.sh layered ;;
  layered1) LAYERED_BATCHES=1 LAYERED_POS=129,384 LAYERED_TIMEOUT=200 bash perf/device/h200_persistent.sh layered ;;
  untuned) timeout 150 python3 perf/triton_step_profile.py --batches 1,32 --pos 129 --out $OUT/untuned_profile.json 2>&1 \
             | grep -v -i warn | grep -v "L2 prefetch" | tail -40 ;;
  tests) TEST_TIMEOUT=300 bash perf/device/h200_persistent.sh tests ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
