#!/usr/bin/env bash
# One H200 call: GPU kernel tests (the post-H2 fused-block changes), then training throughput of the
# code before the one-loop redesign (.before/, commit 0558fe6) and after it, in the same call, plus the
# transformers baselines (eager, compile, Liger). Usage (device tool): bash perf/device/h200_train.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
NOW=$PWD/src:/tmp/site
OLD=$PWD/.before/src:/tmp/site
echo "== GPU kernel tests"
PYTHONPATH=$NOW timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "cuda or gpu" 2>&1 | tail -4
PRE=(--config tinyllama-1.1b --data.sources synthetic --train.max_steps 40 --optim.warmup_steps 10 --train.eval_every 0
     --train.save_every 0 --train.save_final false --train.log_every 10 --train.micro_batch 8 --train.global_batch 8
     --train.tensorboard false)
for i in 1; do
  echo "== pretrain loop, before (run $i)"
  PYTHONPATH=$OLD timeout 150 python3 -m tinyllama pretrain "${PRE[@]}" --out /tmp/pre_old$i 2>&1 | grep -E "throughput|error"
  echo "== pretrain loop, after (run $i)"
  PYTHONPATH=$NOW timeout 150 python3 -m tinyllama pretrain "${PRE[@]}" --out /tmp/pre_new$i 2>&1 | grep -E "throughput|error"
done
echo "== bench train ours, before"
PYTHONPATH=$OLD timeout 120 python3 -m tinyllama bench train --variants ours --steps 15 --json $OUT/bench_train_before.json 2>&1 | tail -3
echo "== bench train, after + baselines"
PYTHONPATH=$NOW timeout 420 python3 -m tinyllama bench train --variants ours,hf-eager,hf-compile,hf-liger --steps 15 --json $OUT/bench_train.json 2>&1 | tail -12
