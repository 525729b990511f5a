#!/usr/bin/env bash
# One H200 call for issue 15's committed results: bench generate (ours vs transformers dynamic / static /
# static + compile), loss curves against transformers (120M, 1.1B), bench serve vs transformers'
# continuous batching, and the serve engine's step profile. Usage: bash perf/device/h200_final.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== bench generate"
timeout 130 python3 -m tinyllama bench generate --batch-sizes 1,32 --time-budget 100 --json $OUT/bench_generate.json 2>&1 | grep -v -i warn | tail -12
echo "== loss curve 120M"
timeout 110 python3 perf/loss_curve.py --config tinyllama-120m --data .perfdata/tokens.npy --steps 200 --perturbed-seeds 3 --fp32-residual-run --out $OUT/loss_curve_120m_hf.json 2>&1 | grep -E "^[a-z].*s, first|within|\"fast\"|bound" | head -20
echo "== loss curve 1.1B"
timeout 160 python3 perf/loss_curve.py --config tinyllama-1.1b --data .perfdata/tokens.npy --steps 100 --perturbed-seeds 1 --out $OUT/loss_curve_1.1b_hf.json 2>&1 | grep -E "^[a-z].*s, first|within|\"fast\"|bound" | head -20
echo "== bench serve vs transformers"
timeout 140 python3 -m tinyllama bench serve --preset tinyllama-1.1b --device cuda --requests 200 --clients 16 --max-tokens 64 \
  --batch-sizes 16 --compile --transformers --json $OUT/bench_serve.json 2>&1 | grep -v -i warn | tail -4
echo "== serve engine profile"
timeout 50 python3 perf/serve_profile.py 2>&1 | tail -4
