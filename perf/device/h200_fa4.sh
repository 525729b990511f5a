#!/usr/bin/env bash
# H200 calls for the training step with FlashAttention-4's CuTe kernels (attention_backend: fa4),
# 2026-12-03, seventh session; the step in a CUDA graph (ours-graph, ours-fa4-graph), eighth session. Write the output to $OUT
# (`... > $OUT/log.txt 2>&1`).
#
# flash-attn-4 needs nvidia-cutlass-dsl, whose CUDA 13 library wheel (92 MB; 63.5 MB as tar.xz) is larger
# than one call may carry (64 MiB with the tree). So it travels in two calls on the same warm machine:
#   call 1: carry .fa4a (the first 45 MB of nvidia_cutlass_dsl_libs_cu13-4.8.1 as cu13.tar.xz) -> part `stash`
#   call 2, within the machine's idle window: carry .fa4b (the rest + the small wheels) and .whl -> `install ...`
# Build them here (python 3.12 wheels, see /work/.library/device/README.md):
#   pip download --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform any -d W flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 \
#     nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
#     apache-tvm-ffi torch-c-dlpack-ext quack-kernels liger-kernel
#   and into .fa4b/ifmissing (installed only where the device's Python lacks them): cuda-bindings (13.x, the
#   manylinux_2_28 wheel), protobuf, einops (what libs-core, flash-attn-4 and quack require)
#   unzip the libs-cu13 wheel into D; (cd D && tar cf - . | xz -9e) > cu13.tar.xz; split -b 45000000 -d cu13.tar.xz cu13.part
#   .fa4a/cu13.part00; .fa4b/cu13.part01 + the other wheels
# Since 4.4 the cutlass Python package (cutlass/cute/...) is in nvidia-cutlass-dsl-libs-core, not libs-base: without
#   it `import cutlass.cute` fails (twentieth session's call 3).
# Usage: bash perf/device/h200_fa4.sh [stash|install|tests|attention|bench|profile|train-json]...
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SITE=/tmp/site
export PYTHONPATH=$PWD/src:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages  # the .pth cutlass-dsl ships is not read from PYTHONPATH
for part in "$@"; do
  echo "-- $(date -u +%H:%M:%S) $part"
  case $part in
  stash)
    mkdir -p /tmp/fa4parts && cp .fa4a/cu13.part00 /tmp/fa4parts/ && ls -la /tmp/fa4parts ;;
  install)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl .fa4b/*.whl || exit 1
    for dep in cuda.bindings:cuda_bindings google.protobuf:protobuf einops:einops; do  # only where missing
      python3 -c "import ${dep%%:*}" 2>/dev/null && continue
      echo "installing ${dep##*:}"; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .fa4b/ifmissing/${dep##*:}-*.whl || exit 1
    done
    cat /tmp/fa4parts/cu13.part00 .fa4b/cu13.part01 > /tmp/cu13.tar.xz && sha256sum /tmp/cu13.tar.xz
    tar xJf /tmp/cu13.tar.xz -C $SITE && rm /tmp/cu13.tar.xz
    python3 -c "import flash_attn.cute, cutlass; print('flash_attn.cute from', flash_attn.cute.__file__, 'cutlass', cutlass.__version__ if hasattr(cutlass, '__version__') else '')" 2>&1 | tail -3 ;;
  tests)  # the new backends and kernels against their references on the GPU
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "attention or fa4 or fused_blocks or cross_entropy or weight_grad" 2>&1 | tail -6
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_train_graph.py tests/test_kernels_adamw.py 2>&1 | grep -v -i warn | tail -15 ;;
  attention)  # each attention backend against fp64, then fwd+bwd at the training shape
    timeout 200 python3 perf/gpu_perf.py --sdpa 2>&1 | grep -v -i warn | tail -60 ;;
  bench)  # the step variants side by side, same run; writes $OUT/best_flags: the bench flags of the fastest
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
      --format=csv -lms 1000 > $OUT/smi_bench.csv 2>&1 & smi=$!
    timeout 420 python3 perf/gpu_perf.py --bench ${BENCH_VARIANTS:-ours,ours-fa4} --steps 15 2>&1 | grep -v -i warn | tail -14
    kill $smi
    cp $OUT/perf.json $OUT/perf_bench.json
    python3 perf/device/best_flags.py $OUT/perf_bench.json > $OUT/best_flags; echo "best: $(cat $OUT/best_flags)" ;;
  profile)
    timeout 200 python3 perf/gpu_perf.py --profile ${PROFILE_VARIANT:-ours-fa4} 2>&1 | grep -v -i warn | tail -${PROFILE_LINES:-70} ;;
  train-json)  # the committed bench: ours with the chosen flags beside the fastest baseline
    flags=${TRAIN_FLAGS:-$(cat $OUT/best_flags 2>/dev/null)}; echo "ours with: $flags"
    timeout ${TRAIN_TIMEOUT:-540} python3 -m tinyllama bench train --variants ${TRAIN_VARIANTS:-ours,hf-liger} --steps 15 $flags \
      --json $OUT/bench_train.json 2>&1 | grep -v -i warn | tail -12 ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
echo "-- $(date -u +%H:%M:%S) done"
