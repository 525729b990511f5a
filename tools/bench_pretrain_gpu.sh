#!/usr/bin/env bash
# Pretraining throughput of the TinyLlama-1.1B recipe on GPUs (synthetic tokens, no checkpoint writes
# except where noted). Usage: tools/bench_pretrain_gpu.sh OUT_DIR [MICRO_BATCH] [NGPUS]
set -u
OUT=${1:-out/bench}; MB=${2:-8}; NG=${3:-2}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
COMMON=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 50 --optim.warmup_steps 10
        --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
        --train.micro_batch "$MB" --train.tensorboard false)
echo "== 1 GPU, micro-batch $MB, bf16 autocast, eager"
python -m tinyllama pretrain "${COMMON[@]}" --train.global_batch "$MB" --train.save_final false --out "$OUT/1gpu"
echo "== $NG GPUs, FSDP2, micro-batch $MB per GPU, bf16 params / fp32 reduce, final checkpoint (async DCP)"
python -m torch.distributed.run --standalone --nproc_per_node "$NG" -m tinyllama pretrain "${COMMON[@]}" \
  --train.global_batch $((MB * NG)) --train.save_every 25 --out "$OUT/${NG}gpu"
echo "== resume the $NG-GPU checkpoint on 1 GPU (resharding), 2 more steps"
python -m tinyllama pretrain "${COMMON[@]}" --train.global_batch $((MB * NG)) --train.max_steps 52 \
  --train.save_final false --out "$OUT/${NG}gpu" --resume
