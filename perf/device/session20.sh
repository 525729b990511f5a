#!/usr/bin/env bash
# Twentieth session, issue 15: optim.compute_copies on by default with the Triton AdamW. Parts, by call:
#   stash (carry .fa4a): the card's name, the first part of the cutlass-dsl library kept in /tmp for `train`,
#     and the GPU tests of the copies (the default path in `pretrain` included);
#   train (carry .fa4b and .whl, same warm machine): install flash-attn-4 and liger, then the committed bench
#     (`bench train --variants ours,hf-liger --attention-backend fa4 --cuda-graph --adamw-kernel triton`, copies
#     by default now) for bench_train.json, then ours again with `--compute-copies off` (the same step casting);
#   decode (carry .whl): `bench generate` 1/32 with the transformers rows on an H200, or without them (and a
#     longer budget, so the 32-row Triton row finishes) on an H100.
set -u
export PYTHONUNBUFFERED=1
SITE=/tmp/site
export PYTHONPATH=$PWD/src:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
for part in "$@"; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  stash)
    bash perf/device/h200_fa4.sh stash | tail -2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl 2>/dev/null
    timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_weight_copies.py \
      tests/test_train_graph.py -k "copies" 2>&1 | grep -E "passed|failed|^E |FAILED|Error" | head -12 ;;
  train)
    bash perf/device/h200_fa4.sh install | tail -2
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
      --format=csv -lms 1000 > $OUT/smi_train.csv 2>&1 & smi=$!
    flags="--attention-backend fa4 --cuda-graph --adamw-kernel triton"
    TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-330} TRAIN_FLAGS="$flags" bash perf/device/h200_fa4.sh train-json | grep -v "^--"
    echo "-- $(date -u +%H:%M:%S) ours, casting"
    timeout ${CAST_TIMEOUT:-150} python3 -m tinyllama bench train --variants ours --steps 15 $flags --compute-copies off \
      --json $OUT/bench_train_cast.json 2>&1 | grep -v -i warn | tail -2 | cut -c1-200
    kill $smi ;;
  decode)
    if echo "$gpu" | grep -q H200; then
      BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=${BENCH_TIMEOUT:-420} BENCH_ARGS="--triton-max-batch 32" \
        bash perf/device/h200_persistent.sh bench
    else
      BATCHES=1,32 BENCH_BUDGET=420 BENCH_TIMEOUT=${BENCH_TIMEOUT:-520} BENCH_ARGS="--triton-max-batch 32 --no-hf" \
        bash perf/device/h200_persistent.sh bench
    fi ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
