#!/usr/bin/env bash
# One call on a 2-GPU host: FSDP2 with the fused blocks, NCCL limited to fewer channels (SMs taken from the
# GEMMs that overlap the collectives) and, for reference, the bf16 gradient reduce.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out/fsdp}; W=/tmp/fsdpn; mkdir -p "$OUT" "$W"
COMMON=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 50 --optim.warmup_steps 10
        --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
        --train.micro_batch 8 --train.tensorboard false --train.fast_kernels true --train.save_final false)
RUN_TIMEOUT=200
source "$(dirname "$0")/pretrain_runs.sh"
NCCL_MAX_NCHANNELS=8 run1 2gpu-fused-nch8 0,1 2
run1 2gpu-fused-bf16reduce 0,1 2 --train.fsdp_reduce_dtype bfloat16
for f in "$OUT"/*.log; do echo "--- $(basename $f)"; grep -E "^step [2345]0/|throughput|Error|error" "$f" | cut -c1-110 | tail -5; done
