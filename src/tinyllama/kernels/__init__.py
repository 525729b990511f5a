"""Fused training kernels, each with a plain-PyTorch reference (see tests/test_kernels.py).

`apply_fast_path(model, KernelConfig(...))` is the one entry point the trainer uses.
"""

from tinyllama.kernels.cross_entropy import (
    LinearCrossEntropyLoss,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)
from tinyllama.kernels.attention import causal_attention
from tinyllama.kernels.fast_path import KernelConfig, apply_fast_path

__all__ = [
    "KernelConfig",
    "LinearCrossEntropyLoss",
    "apply_fast_path",
    "causal_attention",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
]
