#!/usr/bin/env bash
# One H200 call for the serve-engine changes of 2026-12-02 (batched sampling, prompts riding along in decode
# steps, overlapped steps): the CUDA serve/generate tests, then bench serve with --prefill-in-decode 0, 32, and
# 32 with --overlap (16 slots and 1, temperature 0.8 with a seed per request, as issue 15's figures), then the
# engine profile (a warm-up run first).
# Needs .whl/ (carry it) with fastapi, uvicorn, openai, httpx and their dependencies for the device's Python 3.12:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --implementation cp -d .whl fastapi uvicorn openai httpx zstandard
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#     --implementation cp -d .whl liger-kernel        # (13 MB in all; liger only for bench train)
# Usage: bash perf/device/h200_serve_next.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_serve.py tests/test_generate.py -k "cuda" 2>&1 | tail -3
for variant in "--prefill-in-decode 0" "--prefill-in-decode 32" "--prefill-in-decode 32 --overlap"; do
  echo "== bench serve $variant"
  name=$(echo "$variant" | tr -d ' -')
  timeout 150 python3 -m tinyllama bench serve --preset tinyllama-1.1b --device cuda --requests 200 --clients 16 \
    --max-tokens 64 --batch-sizes 16,1 --compile $variant --json $OUT/bench_serve_$name.json 2>&1 \
    | grep -v -i warn | tail -3
done
echo "== serve engine profile"
timeout 80 python3 perf/serve_profile.py --out $OUT/serve_profile.json 2>&1 | tail -4
