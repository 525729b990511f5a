#!/usr/bin/env bash
# Eighteenth session, issue 15: the training step with and without the residual copy written by the norm kernel
# (fused block: addmm_ into the norm's copy instead of addmm, whose CUDA path copies the residual first,
# `memcpy128`). Two trees, each in its own processes, alternating: exp_base/src (an untracked
# `git archive <commit> src` of the commit before) and src. `bench train` ours (default attention, CUDA graph,
# Triton AdamW; flash-attn-4 needs two calls to carry, so not here), then a profile of each tree, then the GPU
# tests of the fused block and the graphed training step.
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 1000 > $OUT/smi_train.csv 2>&1 & smi=$!
i=0
for tree in ${TREES:-exp_base/src src exp_base/src src}; do
  i=$((i + 1)); label=$(echo $tree | tr / _)_$i
  echo "-- $(date -u +%H:%M:%S) bench train $tree"
  PYTHONPATH=$PWD/$tree:/tmp/site timeout ${TRAIN_TIMEOUT:-150} python3 -m tinyllama bench train --variants ours \
    --steps 15 --cuda-graph --adamw-kernel triton --json $OUT/bench_train_$label.json 2>&1 | grep -v -i warn | tail -3 | cut -c1-200
done
for tree in ${PROFILE_TREES:-exp_base/src src}; do
  label=$(echo $tree | tr / _)
  echo "-- $(date -u +%H:%M:%S) profile $tree"
  PYTHONPATH=$PWD/$tree:/tmp/site timeout ${PROFILE_TIMEOUT:-150} python3 perf/gpu_perf.py --profile ours-graph-tadamw \
    2>&1 | grep -v -i warn | grep -i -E "span|kernel_sum|matmul|attention|triton|adamw|copies|memcpy|rms_norm|pointwise|clip" | head -24 | cut -c1-160
  [ -f $OUT/perf.json ] && mv $OUT/perf.json $OUT/profile_$label.json
done
kill $smi
echo "-- $(date -u +%H:%M:%S) tests"
PYTHONPATH=$PWD/src:/tmp/site timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_kernels.py tests/test_train_graph.py -k "${TESTS_K:-fused_block or fast_path_fused or residual or graphed_step_equals or pretrain_with_cuda_graph}" 2>&1 | tail -6
echo "-- $(date -u +%H:%M:%S) done"
