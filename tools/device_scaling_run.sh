#!/usr/bin/env bash
# One call on a 4-GPU host: the TinyLlama-1.1B recipe (synthetic tokens, micro-batch 8 × 2048 per GPU, no
# accumulation) for 50 steps on 1, 2 and 4 GPUs with the fused fast path, plus the eager path on 1 GPU, then a
# resume of the 4-GPU checkpoint on 1 GPU and a 4-GPU HSDP (2 replicas × 2 shards) run.
# Phase 1 runs three jobs side by side (GPU0: 1-GPU fast, GPU1: 1-GPU eager, GPUs 2-3: FSDP2 fast) so that
# every GPU is busy, as in phase 2 (4-GPU FSDP2). Logs and metrics land in $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out/scaling}; W=/tmp/scaling; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
STEPS=${STEPS:-50}
COMMON=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps "$STEPS" --optim.warmup_steps 10
        --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
        --train.micro_batch 8 --train.tensorboard false)
FAST=(--train.fast_kernels true)
source "$(dirname "$0")/pretrain_runs.sh"
T0=$(date +%s)
echo "== phase 1"
run1 1gpu-fast 0 1 "${FAST[@]}" --train.save_final false &
run1 1gpu-eager 1 1 --train.save_final false &
run1 2gpu-fast 2,3 2 "${FAST[@]}" --train.save_final false &
wait
echo "== phase 2 ($(( $(date +%s) - T0 )) s): 4 GPUs, FSDP2, fast path, async checkpoint at step 25 + final"
run1 4gpu-fast 0,1,2,3 4 "${FAST[@]}" --train.save_every 25
echo "== phase 3 ($(( $(date +%s) - T0 )) s): resume the 4-GPU checkpoint on 1 GPU, 2 more steps"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m tinyllama pretrain "${COMMON[@]}" "${FAST[@]}" --train.global_batch 32 \
  --train.max_steps $((STEPS + 2)) --train.save_final false --out "$W/4gpu-fast" --resume > "$OUT/resume-4to1.log" 2>&1
echo "resume rc=$?"
echo "== phase 4 ($(( $(date +%s) - T0 )) s): 4 GPUs, HSDP 2 replicas x 2 shards, fast path, 30 steps"
run1 4gpu-hsdp 0,1,2,3 4 "${FAST[@]}" --train.max_steps 30 --train.hsdp_replicas 2 --train.save_final false
echo "== done ($(( $(date +%s) - T0 )) s)"
( cd "$W" && tar czf "$OUT/metrics.tgz" */metrics.jsonl 2>/dev/null )
for f in "$OUT"/*.log; do echo "--- $f"; grep -E "throughput|step (10|20|30|40|50)/|Error|error|rc=|resumed|peak|MFU" "$f" | tail -12; done
