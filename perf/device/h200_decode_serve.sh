#!/usr/bin/env bash
# One H200 call: the CUDA tests of the one-forward serve engine and decode kernels, then bench serve (compiled engine, 16 slots and
# 1 slot; same load through transformers' continuous batching). Usage: bash perf/device/h200_decode_serve.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
python3 -c 'import fastapi, uvicorn, openai; print("fastapi", fastapi.__version__, "openai", openai.__version__)'
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== CUDA tests"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_serve.py tests/test_kernels_decode.py tests/test_generate.py -k "cuda" 2>&1 | tail -3
echo "== bench serve"
timeout 420 python3 -m tinyllama bench serve --preset tinyllama-1.1b --device cuda --requests 200 --clients 16 --max-tokens 64 \
  --batch-sizes 16,1 --compile --transformers --json $OUT/bench_serve.json 2>&1 | grep -v Warning | tail -8
