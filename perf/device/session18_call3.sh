#!/usr/bin/env bash
# Eighteenth session's last call, within ~400 s of device time: on either card the decode GPU tests of the
# attention candidates (1x512/w16 never ran on a GPU) and the whole-step choice, then `bench generate` 1/32
# without the transformers rows (the full H200 bench with them needs ~450 s, more than is left).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu"
TESTS_K="every_attention_candidate or chosen_again" TEST_TIMEOUT=${TEST_TIMEOUT:-80} bash perf/device/h200_persistent.sh tests
BATCHES=1,32 BENCH_BUDGET=0 BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} BENCH_ARGS="--triton-max-batch 32 --no-hf" bash perf/device/h200_persistent.sh bench
