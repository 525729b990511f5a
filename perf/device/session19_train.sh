#!/usr/bin/env bash
# Nineteenth session, issue 15: bf16 weight copies written by the Triton AdamW (optim.compute_copies,
# kernels/weight_copies.py) instead of casting every weight in every forward. One tree, two settings, each in its
# own processes, alternating: `bench train` ours (default attention, CUDA graph, Triton AdamW) without and with
# --compute-copies; then a profile of each; GPU tests first (the kernel writes the copies, the graph re-casts
# after a load). Then, with the time left, `bench generate` 1/32 without the transformers rows. Carry .whl.
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
echo "-- $(date -u +%H:%M:%S) tests"
timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_weight_copies.py \
  tests/test_kernels_adamw.py tests/test_train_graph.py -k "not fa4" 2>&1 | grep -E "passed|failed|^E |FAILED|Error" | head -20
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 1000 > $OUT/smi_train.csv 2>&1 & smi=$!
i=0
for flags in "" "--compute-copies" "" "--compute-copies"; do
  i=$((i + 1)); label=$([ -n "$flags" ] && echo copies || echo cast)_$i
  echo "-- $(date -u +%H:%M:%S) bench train $label"
  timeout ${TRAIN_TIMEOUT:-120} python3 -m tinyllama bench train --variants ours --steps 15 --cuda-graph \
    --adamw-kernel triton $flags --json $OUT/bench_train_$label.json 2>&1 | grep -v -i warn | tail -2 | cut -c1-200
done
for v in ours-graph-tadamw ours-graph-tadamw-copies; do
  echo "-- $(date -u +%H:%M:%S) profile $v"
  timeout ${PROFILE_TIMEOUT:-100} python3 perf/gpu_perf.py --profile $v 2>&1 | grep -v -i warn \
    | grep -i -E "span|kernel_sum|matmul|attention|triton|adamw|copies|memcpy|rms_norm|pointwise|clip" | head -24 | cut -c1-160
  [ -f $OUT/perf.json ] && mv $OUT/perf.json $OUT/profile_$v.json
done
kill $smi
if [ "${GENERATE:-1}" = 1 ]; then
  BATCHES=1,32 BENCH_BUDGET=200 BENCH_TIMEOUT=${BENCH_TIMEOUT:-240} BENCH_ARGS="--triton-max-batch 32 --no-hf" \
    bash perf/device/h200_persistent.sh bench
fi
echo "-- $(date -u +%H:%M:%S) done"
