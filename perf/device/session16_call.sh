gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
if echo "$gpu" | grep -q H200; then
  BATCHES=1,32 BENCH_BUDGET=300 BENCH_TIMEOUT=430 BENCH_ARGS="--triton-max-batch 32" bash perf/device/h200_persistent.sh bench
  cp perf/device/h200_persistent.sh $OUT/ 2>/dev/null; true
else
  LAYERED_BATCHES=32 LAYERED_POS=129,384 LAYERED_TIMEOUT=360 bash perf/device/h200_persistent.sh layered
  echo "-- untuned 32-row profile (the untuned-tile fix)"; timeout 120 python3 perf/triton_step_profile.py --batches 32 --pos 129 2>&1 | grep -v -i warn | tail -30
fi
