#!/usr/bin/env bash
# Eighteenth session's first call: on an H200 the decode bench for perf/results/h200/bench_generate.json
# (session17_next.sh); on an H100 the training A/B of the residual copy (session18_train_ab.sh) instead.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if echo "$gpu" | grep -q H200; then exec bash perf/device/session17_next.sh; else exec bash perf/device/session18_train_ab.sh; fi
