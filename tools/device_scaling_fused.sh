#!/usr/bin/env bash
# One call on a 2-GPU host: 1 -> 2 GPU scaling of the 1.1B recipe with the default fast path (fused training
# blocks), micro-batch 8 × 2048 per GPU, synthetic tokens, 50 steps; FSDP2 with the recipe's settings.
#   [1a] 1 GPU on GPU 0, then [2] 2 GPUs FSDP2, then [1b] 1 GPU again (spread of the baseline)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out/fsdp}; W=/tmp/fsdp; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 50 --optim.warmup_steps 10
        --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
        --train.micro_batch 8 --train.tensorboard false --train.fast_kernels true --train.save_final false)
RUN_TIMEOUT=240
source "$(dirname "$0")/pretrain_runs.sh"
T0=$(date +%s)
run1 1gpu-a 0 1
run1 2gpu 0,1 2
run1 1gpu-b 1 1
echo "done at $(( $(date +%s) - T0 )) s"
python3 - "$W" <<'PY'
import json, sys, statistics, pathlib
rows = []
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "metrics.jsonl"
    if not f.exists():
        continue
    recs = [json.loads(l) for l in f.read_text().splitlines()]
    w = [r["tokens_per_s_per_device"] for r in recs if r.get("kind") == "train" and "tokens_per_s_per_device" in r and r["step"] >= 20]
    if w:
        rows.append((d.name, statistics.median(w), min(w), max(w)))
print("| run | tokens/s per GPU (median of 10-step windows 11-50) | min | max | MFU |")
for name, med, lo, hi in rows:
    print(f"| {name} | {med:,.0f} | {lo:,.0f} | {hi:,.0f} | {med * 7.31e9 / 989e12:.1%} |")
PY
for f in "$OUT"/*.log; do echo "--- $f"; grep -E "model tinyllama|throughput|Error|error" "$f" | tail -3; done
