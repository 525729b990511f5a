#!/usr/bin/env bash
# Seventeenth session, issue 15: `bench generate` 1/32 (no transformers rows) of two source trees on one machine,
# each in its own process: exp_base/src (an untracked copy of the commit before, `git archive <commit> src`) and
# src (narrow prenorm tiles for gate/up in the deferred step; 8-warp attention candidates). The JSON files
# carry each product's tuned time (`l2_ahead_us_tuned`, column 0), the attention candidates' times, and (src
# only) the tiles the step ran (`step_tiles`).
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
for tree in ${TREES:-exp_base/src src}; do
  label=$(echo $tree | tr / _)
  echo "-- $(date -u +%H:%M:%S) $tree"
  PYTHONPATH=$PWD/$tree:/tmp/site timeout ${BENCH_TIMEOUT:-280} python3 -m tinyllama bench generate --batch-sizes 1,32 \
    --no-hf --triton-max-batch 32 --json $OUT/bench_generate_$label.json 2>&1 | grep -v -i warn | tail -8 | cut -c1-220
done
echo "-- $(date -u +%H:%M:%S) done"
