#!/usr/bin/env bash
# One H200 call: the CUDA tests of the one-forward serve engine and decode kernels, then bench generate
# (ours vs transformers dynamic / static / static + compile) and bench serve (compiled engine, 16 slots and
# 1 slot; same load through transformers' continuous batching). Usage: bash perf/device/h200_decode_serve.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== CUDA tests"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_serve.py tests/test_kernels_decode.py tests/test_generate.py -k "cuda" 2>&1 | tail -3
echo "== bench generate"
timeout 230 python3 -m tinyllama bench generate --batch-sizes 1,8,32 --time-budget 200 --json $OUT/bench_generate.json 2>&1 | grep -v Warning | tail -16
echo "== bench serve"
timeout 300 python3 -m tinyllama bench serve --preset tinyllama-1.1b --device cuda --requests 200 --clients 16 --max-tokens 64 \
  --batch-sizes 16,1 --compile --json $OUT/bench_serve.json 2>&1 | grep -v Warning | tail -8
