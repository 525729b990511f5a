#!/usr/bin/env bash
# H200 call for the persistent batch-1 decode kernel (kernels/decode_persistent.py), 2026-12-06, ninth
# session: its CUDA tests (graph replay == eager, every configuration at the 1.1B's widths vs the layered
# step and the fp32 model, the fallback when its programs cannot all be resident), then `bench generate`
# batch 1 and 32, where the step's tuning times the layered kernels and each persistent configuration
# as whole-step graph replays in the same process. nvidia-smi is polled through the bench (clocks, power).
# Carry .whl (zstandard). Usage: bash perf/device/h200_persistent.sh [tests|profile|layered|attention|sweep|bench]...
# Env: SMI (0: no nvidia-smi polling in `bench`), TEST_TIMEOUT, BENCH_TIMEOUT, SWEEP_TIMEOUT (s), BENCH_BUDGET (bench generate --time-budget; 180 s was spent on the batch-1
# rows and baselines before batch 32 in the eleventh session), BENCH_ARGS (more bench generate flags), BATCHES, ROWS, TESTS_K (pytest -k), LAYERED_BATCHES, LAYERED_POS (positions, e.g. 129,384),
# LAYERED_TIMEOUT (its tuning compiles every candidate: ~30 at 32 rows).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
# drop warning lines, except the tuning's "decode attention ... not used" (a candidate this card refused)
quiet() { awk '!/[Ww]arn/ || /decode attention/'; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv,noheader
for part in "$@"; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  tests)
    # one line per test as it ends (an H100 call of 2026-12-06 hit the timeout before pytest's summary, so
    # the failures had no names), then the summary; the first line of each failure's traceback
    timeout ${TEST_TIMEOUT:-420} python3 -m pytest -v --tb=line --durations=12 -p no:cacheprovider tests/test_kernels_decode.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
      | grep -E "(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|^E |Error|[0-9.]+s (call|setup)" | sed 's/^tests\/test_kernels_decode.py:://' | head -120 ;;
  profile)  # whole-step times (layered vs persistent configurations) and the persistent stages' breakdown
    timeout 150 python3 perf/persistent_profile.py 2>&1 | quiet | tail -80 ;;
  layered)  # the layered step kernel by kernel, tuned (products' tiles, the attention's cache splits)
    timeout ${LAYERED_TIMEOUT:-150} python3 perf/triton_step_profile.py --batches ${LAYERED_BATCHES:-1,32} --pos ${LAYERED_POS:-256} --tune 2>&1 | quiet | tail -90 ;;
  attention)  # every cache-split candidate at several cache lengths, 1 and 32 rows (does the split pay when long?)
    timeout 150 python3 perf/attention_splits.py --out $OUT/attention_splits.json 2>&1 | quiet | tail -14 ;;
  sweep)  # one product of 32 rows: cuBLAS vs our rows kernel vs a plain pipelined / TMA Triton GEMM
    timeout ${SWEEP_TIMEOUT:-330} python3 perf/rows_product_sweep.py --rows ${ROWS:-1,32} 2>&1 | quiet | tail -60 ;;
  bench)  # SMI=0: no nvidia-smi polling beside the bench (its 1 s polling may stall the GPU: perf/NOTES.md, 21st session)
    smi=
    if [ "${SMI:-1}" != 0 ]; then
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv -lms 500 > $OUT/smi_generate.csv 2>&1 & smi=$!
    fi
    timeout ${BENCH_TIMEOUT:-240} python3 -m tinyllama bench generate --batch-sizes ${BATCHES:-1,32} --time-budget ${BENCH_BUDGET:-180} ${BENCH_ARGS:-} \
      --json $OUT/bench_generate.json 2>&1 | quiet | tail -25
    [ -n "$smi" ] && kill $smi ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
