#!/usr/bin/env bash
# One H200 call for the Triton decode step of 2-64 rows (2026-12-02, fourth session): the decode-kernel and
# CUDA serve/generate tests, then bench generate at batch 1, 8, 16 and 32 with the torch.compile'd step
# beside the Triton one at each batch (same run), then bench serve (16 slots and 1; the server's decode
# buckets now run the Triton steps). Needs .whl/ (see h200_serve_next.sh for how to build it); carry it.
# Write the output to $OUT (`... > $OUT/log.txt 2>&1`): a call killed at its limit keeps it. Each part is sized
# for one call of 600 s or less with the others: tests + serve; generate-final alone; serve-overlap + profile.
# Usage: bash perf/device/h200_batched_triton.sh [rows|rows-sweep|generate-rows|profile|step-profile|train-profile|loss-1b|kernel-tests|tests|serve-tests|generate|generate-final|serve|serve-overlap]...
#   loss-1b needs .perfdata/tokens.npy (perf/make_tokens.py; carry .perfdata)
#   (default: tests generate serve)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
parts=${*:-tests generate serve}
for part in $parts; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  rows)
    echo "== rows-kernel candidates vs cuBLAS"
    timeout 240 python3 perf/rows_gemm.py --out $OUT/rows_gemm.json 2>&1 | grep -v -i warn | tail -30 ;;
  profile)
    echo "== Triton step profile"
    timeout 100 python3 perf/triton_step_profile.py --batches 1,8 --out $OUT/triton_step_profile.json 2>&1 | grep -v -i warn | tail -20 ;;
  rows-sweep)  # the 32-row products: the tuner's tiles and up to 80 more from a wider grid, 45 s per product
    echo "== rows-kernel sweep at 32 rows vs cuBLAS"
    timeout 240 python3 perf/rows_gemm.py --batches 32 --products qkv,o,gate_up,down --sweep 80 --budget-s ${SWEEP_BUDGET:-45} \
      --out $OUT/rows_sweep.json 2>&1 | grep -v -i warn | tail -8 ;;
  generate-rows)  # batch 16 and 32: the Triton step (split-K candidates) beside the compiled step, same run
    echo "== bench generate 16, 32"
    timeout 400 python3 -m tinyllama bench generate --preset tinyllama-1.1b --device cuda --batch-sizes 16,32 \
      --triton-max-batch 32 --no-hf --json $OUT/bench_generate_rows.json 2>&1 | grep -v -i warn | tail -8 ;;
  step-profile)  # per product (q/k/v, o, gate/up, down, head) at batch 1 and 32, tuned tiles
    echo "== Triton step profile, tuned, batch 1 and 32"
    timeout 200 python3 perf/triton_step_profile.py --batches 1,32 --tune --out $OUT/triton_step_profile.json 2>&1 | grep -v -i warn | tail -30 ;;
  train-profile)  # the training step (fused blocks, the default) under torch.profiler: ms per step by kind
    echo "== training step profile"
    timeout 200 python3 perf/gpu_perf.py --profile ours 2>&1 | grep -v -i warn | tail -70 ;;
  loss-1b)  # 1.1B loss curve against transformers, three perturbed-transformers seeds for the noise bound
    echo "== loss curve 1.1B"
    timeout 330 python3 perf/loss_curve.py --config tinyllama-1.1b --data .perfdata/tokens.npy --steps 100 --perturbed-seeds 3 \
      --out $OUT/loss_curve_1.1b_hf.json 2>&1 | grep -E "^[a-z].*s, first|within|\"fast\"|bound" | head -20 ;;
  kernel-tests)
    echo "== decode kernel tests"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py 2>&1 | tail -4 ;;
  tests)
    echo "== CUDA tests"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py --tb=line -rf 2>&1 | tail -20
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_serve.py tests/test_generate.py -k "cuda" --tb=short -rf 2>&1 | tail -40 ;;
  serve-tests)  # the CUDA serve/generate tests alone (the decode kernels unchanged since their last pass)
    echo "== CUDA serve/generate tests"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_serve.py tests/test_generate.py -k "cuda" --tb=short -rf 2>&1 | tail -40 ;;
  generate)
    echo "== bench generate"
    timeout 330 python3 -m tinyllama bench generate --preset tinyllama-1.1b --device cuda --batch-sizes 1,8,16,32 \
      --no-hf --json $OUT/bench_generate_batched.json 2>&1 | grep -v -i warn | tail -16 ;;
  generate-final)  # the bench_generate.json: baselines in the same run, the default engine at 1, 16, 32
    echo "== bench generate (final)"
    timeout 560 python3 -m tinyllama bench generate --preset tinyllama-1.1b --device cuda --batch-sizes 1,16,32 \
      --triton-max-batch 32 --time-budget 480 --json $OUT/bench_generate.json 2>&1 | grep -v -i warn | tail -20 ;;
  serve-overlap)  # overlap is the default since 2026-12-03: this part now runs the other side, --no-overlap
    echo "== bench serve --no-overlap"
    timeout ${SERVE_TIMEOUT:-200} python3 -m tinyllama bench serve --preset tinyllama-1.1b --device cuda --requests 200 \
      --clients 16 --max-tokens 64 --batch-sizes 16,1 --compile --no-overlap --json $OUT/bench_serve_no_overlap.json 2>&1 \
      | grep -v -i warn | tail -6 ;;
  serve)
    echo "== bench serve"
    timeout ${SERVE_TIMEOUT:-200} python3 -m tinyllama bench serve --preset tinyllama-1.1b --device cuda --requests 200 --clients 16 \
      --max-tokens 64 --batch-sizes 16,1 --compile --transformers --json $OUT/bench_serve.json 2>&1 \
      | grep -v -i warn | tail -10 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
