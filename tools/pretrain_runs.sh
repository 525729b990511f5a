# Sourced by tools/device_scaling_run.sh, tools/device_fsdp_variants.sh and tools/device_scaling_2gpu.sh
# (set COMMON, OUT, W first; RECIPE_50 is the 1.1B recipe's 50-step measuring run they share).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RECIPE_50=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 50 --optim.warmup_steps 10
           --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
           --train.micro_batch 8 --train.tensorboard false --train.fast_kernels true --train.save_final false)
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

# window_table DIR: per run under DIR, the median (and range) of its 10-step tokens/s-per-GPU windows after step 10.
window_table() {
  python3 - "$1" <<'PY'
import json, sys, statistics, pathlib
print("| run | tokens/s per GPU (median of 10-step windows 11-50) | min | max | MFU |")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "metrics.jsonl"
    if not f.exists():
        continue
    recs = [json.loads(l) for l in f.read_text().splitlines()]
    w = [r["tokens_per_s_per_device"] for r in recs
         if r.get("kind") == "train" and "tokens_per_s_per_device" in r and r["step"] >= 20]
    if w:
        med = statistics.median(w)
        print(f"| {d.name} | {med:,.0f} | {min(w):,.0f} | {max(w):,.0f} | {med * 7.31e9 / 989e12:.1%} |")
PY
}
