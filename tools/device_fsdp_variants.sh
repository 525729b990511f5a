#!/usr/bin/env bash
# One call on a 4-GPU host: per-GPU throughput of the 1.1B recipe (fast path, micro-batch 8 × 2048 per GPU,
# synthetic tokens, 50 steps) under FSDP2 settings, to measure 1 -> 2 -> 4 GPU scaling.
#   phase 1: [A] 2 GPUs defaults              | [B] 2 GPUs fsdp_reshard_after_forward=false
#   phase 2: [1] 1 GPU (baseline, GPU 0)      | [C] 2 GPUs reshard false + bf16 gradient reduce
#   phase 3: [D] 4 GPUs reshard false         ; phase 4: [E] 4 GPUs defaults
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out/fsdp}; W=/tmp/fsdp; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 50 --optim.warmup_steps 10
        --train.eval_every 0 --train.eval_blocks 8 --train.save_every 0 --train.log_every 10
        --train.micro_batch 8 --train.tensorboard false --train.fast_kernels true --train.save_final false)
RUN_TIMEOUT=300
source "$(dirname "$0")/pretrain_runs.sh"
T0=$(date +%s)
run1 A-2gpu 0,1 2 & run1 B-2gpu-keep 2,3 2 --train.fsdp_reshard_after_forward false & wait
echo "phase 2 at $(( $(date +%s) - T0 )) s"
run1 1gpu 0 1 & run1 C-2gpu-keep-bf16reduce 2,3 2 --train.fsdp_reshard_after_forward false --train.fsdp_reduce_dtype bfloat16 & wait
echo "phase 3 at $(( $(date +%s) - T0 )) s"
run1 D-4gpu-keep 0,1,2,3 4 --train.fsdp_reshard_after_forward false
echo "phase 4 at $(( $(date +%s) - T0 )) s"
run1 E-4gpu 0,1,2,3 4
echo "done at $(( $(date +%s) - T0 )) s"
( cd "$W" && tar czf "$OUT/metrics.tgz" */metrics.jsonl 2>/dev/null )
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
        rows.append((d.name, statistics.median(w), min(w), max(w), w[-1]))
print("| run | tokens/s per GPU (median of 10-step windows 11-50) | min | max | MFU |")
for name, med, lo, hi, _ in rows:
    print(f"| {name} | {med:,.0f} | {lo:,.0f} | {hi:,.0f} | {med * 7.31e9 / 989e12:.1%} |")
PY
for f in "$OUT"/*.log; do echo "--- $f"; grep -E "throughput|Error|error" "$f" | tail -3; done
