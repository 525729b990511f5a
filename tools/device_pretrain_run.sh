#!/usr/bin/env bash
# One device call: the GPU pretraining benchmark plus, on 2 spare CPU cores, a timing of the CPU demo.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, yaml, tokenizers, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.device_count())"
python3 -c "import zstandard, pyarrow" 2>&1 | tail -1
( CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout ${DEMO_S:-330} taskset -c 14,15 python3 -m tinyllama pretrain \
    --out /tmp/demo --train.data_root out/data > "$OUT/demo.log" 2>&1; cp /tmp/demo/metrics.jsonl "$OUT/demo-metrics.jsonl" ) &
DEMO=$!
timeout ${BENCH_S:-300} bash tools/bench_pretrain_gpu.sh /tmp/bench "${MB:-8}" 2 2>&1 | tee "$OUT/bench.log"
cp /tmp/bench/1gpu/metrics.jsonl "$OUT/1gpu-metrics.jsonl" 2>/dev/null
cp /tmp/bench/2gpu/metrics.jsonl "$OUT/2gpu-metrics.jsonl" 2>/dev/null
ls -la /tmp/bench/2gpu/checkpoints 2>/dev/null
wait $DEMO
cp /tmp/demo/metrics.jsonl "$OUT/demo-metrics.jsonl" 2>/dev/null
tail -5 "$OUT/demo.log"
