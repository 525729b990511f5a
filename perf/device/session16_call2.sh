#!/usr/bin/env bash
# Sixteenth session, issue 15, after the early PDL start landed (the defaults of bench_or_tests_by_card.sh).
exec bash perf/device/bench_or_tests_by_card.sh
