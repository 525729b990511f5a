#!/usr/bin/env bash
# Next calls (written in the twenty-first session, extended in the twenty-second; none ran there: no machine). Carry .whl.
# Parts; the order to run them is in perf/NOTES.md, twenty-second session, Next:
#   tests    the GPU tests of the 21st and 22nd sessions' changes (~180 s): the kept tuning taken by a new
#            process without timing; the transformers rows' compile flags; the tuning store; the prompt
#            prefill on the flash kernel; test_generate (its compiled prefill graphs)
#   flash    the prompt prefill runs under SDPA's flash kernel alone (~20 s; also in `tests`)
#   prefill  where the 32-row prefill's 14.7 ms go, with from_start and with the mask (perf/prefill_profile.py, ~150 s)
#   final    `bench generate` 1/32 with the transformers rows (now: static cache uncompiled, and compiled by
#            transformers), for perf/results/h200/bench_generate.json (~380 s on a fresh machine), without the
#            nvidia-smi polling beside it
#   ab1      batch 1 at dab55bb (carry .ab_base: `mkdir -p .ab_base && git archive dab55bb src | tar -x -C .ab_base`)
#            and at this tree, base-HEAD-base (~300 s): is the 23rd session's 3 % slower batch 1 the card?
#   train    (after `bash perf/device/h200_fa4.sh stash` with .fa4a on the same warm machine; carry .whl and .fa4b)
#            is the 1 s nvidia-smi polling what stalls ours every 5th step? The committed bench train without
#            polling (-> bench_train.json), then ours alone with and without it, each step's ms printed (~200 s)
set -u
source perf/device/setup.sh
gpu_tests() {  # gpu_tests TIMEOUT PYTEST-ARGS...: the summary and failures only; the whole log under $OUT (the
  # 24th session's `tests` hit its timeout and its lines were past the reply's tail: nothing said how far it got)
  timeout "$1" python3 -m pytest -v -p no:cacheprovider "${@:2}" > $OUT/gpu_tests_$part.log 2>&1
  rc=$?
  grep -c " PASSED" $OUT/gpu_tests_$part.log | sed 's/^/passed: /'
  grep -E "FAILED|^E |Error|passed|failed" $OUT/gpu_tests_$part.log | head -20
  if [ $rc = 124 ]; then
    echo "pytest stopped by its $1 s timeout; last test started: $(grep -E '::' $OUT/gpu_tests_$part.log | tail -1)"
  fi
}
for part in "$@"; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  tests)
    gpu_tests ${TEST_TIMEOUT:-240} tests/test_kernels_tuning_store.py tests/test_bench_generate.py \
      "tests/test_kernels_decode.py::test_a_new_process_takes_the_kept_tuning_without_timing_cuda" \
      tests/test_model.py::test_prefill_from_start_runs_on_the_flash_kernel_cuda tests/test_generate.py ;;
  flash)
    gpu_tests 120 tests/test_model.py::test_prefill_from_start_runs_on_the_flash_kernel_cuda ;;
  prefill)
    timeout ${PREFILL_TIMEOUT:-240} python3 perf/prefill_profile.py --rows 32 --masked --out $OUT/prefill_profile.json 2>&1 \
      | grep -v -i "warn" | tail -30 ;;
  final)
    SMI=0 BATCHES=1,32 BENCH_BUDGET=${BENCH_BUDGET:-430} BENCH_TIMEOUT=${BENCH_TIMEOUT:-540} BENCH_ARGS="--triton-max-batch 32 --no-torch-step" \
      bash perf/device/h200_persistent.sh bench | grep -v "^  File\|^    \|^-- .* done" ;;
  train)
    bash perf/device/h200_fa4.sh install | tail -2
    export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages  # as h200_fa4.sh sets it
    flags="--attention-backend fa4 --cuda-graph --adamw-kernel triton"
    TRAIN_TIMEOUT=200 TRAIN_FLAGS="$flags" bash perf/device/h200_fa4.sh train-json | grep -v "^--"
    for label in smi nosmi; do
      smi=
      if [ $label = smi ]; then
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
          --format=csv -lms 1000 > $OUT/smi_train.csv 2>&1 & smi=$!
      fi
      echo "-- $(date -u +%H:%M:%S) ours, $label"
      timeout 150 python3 -m tinyllama bench train --variants ours --steps 15 $flags --json $OUT/bench_train_$label.json \
        2>&1 | grep -v -i warn | tail -1 | cut -c1-160
      [ -n "$smi" ] && kill $smi
    done
    python3 - $OUT/bench_train.json $OUT/bench_train_smi.json $OUT/bench_train_nosmi.json <<'PY'
import json, statistics, sys
for path in sys.argv[1:]:
    for r in json.load(open(path))["results"]:
        each = (r.get("details") or {}).get("step_ms_each") or []
        if each:
            print(f"{path.rsplit('/', 1)[-1]:24} {r['variant']:9} {r['tokens_per_s']:9,.0f} tok/s  mean {statistics.mean(each):.1f} "
                  f"median {statistics.median(each):.1f} ms: {' '.join(f'{t:.0f}' for t in each)}")
PY
    ;;
  ab1)  # batch 1 at the twenty-first session's tree (.ab_base/src, carried) and at this one, in one call: the 23rd
        # session's H100 gave 1,064.8 tok/s (step 959 µs) against 1,098 (927 µs) in sessions 16-20
    [ -d .ab_base/src ] || { echo "ab1: carry .ab_base (see the header)"; exit 2; }
    n=0
    for tree in .ab_base/src src .ab_base/src; do  # the base twice: first and last, so warm-up order shows
      n=$((n + 1)); echo "-- $(date -u +%H:%M:%S) batch 1 at $tree"
      PYTHONPATH=$PWD/$tree:/tmp/site timeout 150 python3 -m tinyllama bench generate --batch-sizes 1 --no-hf \
        --time-budget 120 --triton-max-batch 32 --no-torch-step --json $OUT/ab1_${n}_${tree//\//_}.json 2>&1 \
        | grep -E "Triton|decode step:|Error" | cut -c1-150
    done ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
