#!/usr/bin/env bash
# Sixteenth session, issue 15: the decode step's programmatic dependent launch (PDL), three source trees in one
# call, each tuned and profiled in its own process (perf/triton_step_profile.py --tune, graph replays):
#   exp_baseline/src  the commit before (the deferred step's norm kernels launched without PDL: a full barrier)
#   src               the norm kernels launched with PDL (wait first; the next product's first weight tile
#                     read while they run)
#   exp_early/src     as src, and every kernel lets the next one launch at its start (launch_dependents before
#                     its first-tile reads and before its wait), not after its wait
# The two exp_ trees were carried (untracked copies, not committed): exp_baseline/src is `git archive 15c50bc src`,
# exp_early/src what commit 1788d7c landed (but for the split attention's trigger, then still after its wait).
# Then the GPU tests of the graph replay and the batched step on the trees that changed.
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
profile() {  # tree batches label
  echo "-- $(date -u +%H:%M:%S) $3 (batches $2)"
  PYTHONPATH=$PWD/$1:/tmp/site timeout ${PROFILE_TIMEOUT:-150} python3 perf/triton_step_profile.py --batches $2 --pos 129 --tune \
    --out $OUT/profile_$3_$(echo $2 | tr , _).json 2>&1 | grep -E "graph replay|^ +[0-9.]+ us |^ +(qkv|o|gate_up|down|head):|attention Att|Error|error" | cut -c1-200
}
for part in ${PARTS:-b32 b1 tests}; do
  case $part in
  b32) profile exp_baseline/src 32 baseline; profile src 32 pdl_norm; profile exp_early/src 32 early ;;
  b1) profile exp_baseline/src 1 baseline; profile exp_early/src 1 early ;;
  tests)
    for tree in src exp_early/src; do
      echo "-- $(date -u +%H:%M:%S) tests $tree"
      PYTHONPATH=$PWD/$tree:/tmp/site timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py \
        -k "graph_replay_equals_eager or batched_step_matches_model_forward or deferred or engine_triton" 2>&1 | tail -3
    done ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
