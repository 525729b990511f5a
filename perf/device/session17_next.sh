#!/usr/bin/env bash
# The call after the seventeenth session: call 3's, with room for the 32-row bench (its 270 s cut that row on an
# H100; an H200 bench with the transformers rows needs ~450 s).
TESTS_K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or deferred_step_tiles or engine_triton_deferred or l2_prefetch" \
  H200_BENCH_TIMEOUT=450 H200_TEST_TIMEOUT=100 H100_TEST_TIMEOUT=150 H100_BENCH_TIMEOUT=420 \
  exec bash perf/device/bench_or_tests_by_card.sh
