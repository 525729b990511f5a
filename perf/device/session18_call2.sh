#!/usr/bin/env bash
# Eighteenth session's second call, within ~650 s of device time left: session17_next.sh's parts (H200: `bench
# generate` 1/32 with the transformers rows, then the decode GPU tests; H100: the tests, the 1x512/w16 attention
# candidate's included, then the bench without the transformers rows), with shorter timeouts.
TESTS_K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or engine_triton_deferred" \
  H200_BENCH_TIMEOUT=450 H200_TEST_TIMEOUT=90 H100_TEST_TIMEOUT=120 H100_BENCH_TIMEOUT=360 \
  exec bash perf/device/bench_or_tests_by_card.sh
