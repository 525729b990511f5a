#!/usr/bin/env bash
# Seventeenth session, issue 15, call 3: after the 8-warp attention candidates, narrow gate/up tiles and the
# attention chosen in the whole step landed; their GPU tests too.
TESTS_K="every_attention_candidate or chosen_again or graph_replay_equals_eager or batched_step_matches_model_forward or deferred_split_k or deferred_step_tiles or engine_triton_deferred or l2_prefetch" \
  H200_TEST_TIMEOUT=120 exec bash perf/device/bench_or_tests_by_card.sh
