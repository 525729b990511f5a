"""Causal grouped-query attention through a chosen SDPA backend: the training attention of the fast path
(`fast_path.FastAttention`) and of the fused block (`fused_block.FusedBlock`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa_backends(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }[name]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal GQA attention, q (B, H, T, D), k/v (B, KV, T, D), through the chosen SDPA backend.

    cuDNN and the efficient kernel take no grouped heads, so k/v are repeated for them (costs memory).
    """
    gqa = k.size(1) != q.size(1)
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel

    if gqa and backend in ("cudnn", "efficient"):
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    with sdpa_kernel(_sdpa_backends(backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
