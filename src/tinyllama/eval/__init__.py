"""Evaluation: log-likelihood scoring, perplexity, multiple-choice benchmarks, lm-evaluation-harness adapter."""

from tinyllama.eval.scoring import Scorer, rolling_windows  # noqa: F401
