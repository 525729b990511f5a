#!/usr/bin/env bash
# One call on a 2-GPU host: 1 -> 2 GPU scaling of the fused blocks against the per-block compiled blocks,
# same machine (settings as tools/device_scaling_fused.sh).
#   phase 1: [1] compiled, GPU 0 | [1] fused, GPU 1;  phase 2: [2] compiled;  phase 3: [2] fused
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out/fsdp}; W=/tmp/fsdpc; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 50 --optim.warmup_steps 10
        --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
        --train.micro_batch 8 --train.tensorboard false --train.fast_kernels true --train.save_final false)
RUN_TIMEOUT=240
source "$(dirname "$0")/pretrain_runs.sh"
T0=$(date +%s)
run1 1gpu-compiled 0 1 --train.kernels.fused_blocks false & run1 1gpu-fused 1 1 & wait
run1 2gpu-compiled 0,1 2 --train.kernels.fused_blocks false
run1 2gpu-fused 0,1 2
echo "done at $(( $(date +%s) - T0 )) s"
for f in "$OUT"/*.log; do echo "--- $(basename $f)"; grep -E "^step [2345]0/|throughput|Error|error" "$f" | cut -c1-110 | tail -5; done
