# Sourced by tools/device_scaling_run.sh and tools/device_fsdp_variants.sh (set COMMON, OUT, W first).
# run1 NAME GPUS NPROC [overrides...]: `tinyllama pretrain` with "${COMMON[@]}" on CUDA devices GPUS, one
# process (NPROC 1) or torchrun with NPROC ranks; global batch = 8 sequences per rank; log in $OUT/NAME.log.
run1() {
  local name=$1 gpus=$2 n=$3; shift 3
  if [ "$n" = 1 ]; then
    CUDA_VISIBLE_DEVICES=$gpus timeout "${RUN_TIMEOUT:-420}" python3 -m tinyllama pretrain "${COMMON[@]}" \
      --train.global_batch 8 --out "$W/$name" "$@" > "$OUT/$name.log" 2>&1
  else
    CUDA_VISIBLE_DEVICES=$gpus timeout "${RUN_TIMEOUT:-420}" python3 -m torch.distributed.run --standalone \
      --nproc_per_node "$n" --master_port $((29500 + RANDOM % 1000)) -m tinyllama pretrain "${COMMON[@]}" \
      --train.global_batch $((8 * n)) --out "$W/$name" "$@" > "$OUT/$name.log" 2>&1
  fi
  echo "$name rc=$?"
}
