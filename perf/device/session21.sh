#!/usr/bin/env bash
# Twenty-first session. Carry .whl. Parts:
#   rows   `bench generate` at 32 rows only (no transformers rows, no torch.compile'd step, ~200 s on a fresh
#          machine): the deeper-pipeline tiles added to ROWS_CANDIDATES, then each product's chosen tile and the
#          tuned times of gate/up and down (perf/NOTES.md, twenty-first session)
#   final  `bench generate` 1/32 with the transformers rows, for perf/results/h200/bench_generate.json (~380 s)
set -u
source perf/device/setup.sh
for part in "$@"; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  rows)
    BATCHES=32 BENCH_BUDGET=300 BENCH_TIMEOUT=${BENCH_TIMEOUT:-330} BENCH_ARGS="--triton-max-batch 32 --no-torch-step --no-hf" \
      bash perf/device/h200_persistent.sh bench | grep -v "^-- .* done"
    python3 - "$OUT/bench_generate.json" <<'PY'
import json, sys
row = [r for r in json.load(open(sys.argv[1]))["rows"] if r.get("batch") == 32 and "step_tiles" in r][0]
print("chosen:", {k: v.split("(")[1].split(", rowsum")[0] + (" split " + v.split("split_k=")[1].split(",")[0])
                  + (" prenorm" if "prenorm=True" in v else "") for k, v in row["step_tiles"].items()})
for name in ("qkv deferred", "gate_up", "gate_up deferred", "down deferred", "o deferred", "head deferred"):
    times = row.get("tiles_us_tuned", {}).get(name, {})
    print(f"{name:17}", "; ".join(f"{t:.1f} {c.split('(')[1].split(', rowsum')[0]}"
                                  f"{' s' + c.split('split_k=')[1].split(',')[0]}{' nopf' if 'prefetch=False' in c else ''}" for c, t in list(times.items())[:5]))
print("step_us_tuned", row.get("step_us_tuned"), "attention", row.get("attention"))
PY
    ;;
  final)
    BATCHES=1,32 BENCH_BUDGET=430 BENCH_TIMEOUT=${BENCH_TIMEOUT:-540} BENCH_ARGS="--triton-max-batch 32 --no-torch-step" \
      bash perf/device/h200_persistent.sh bench | grep -v "^  File\|^    \|^-- .* done" ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
