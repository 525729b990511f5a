"""Causal grouped-query attention through a chosen backend: the training attention of the fast path
(`fast_path.FastAttention`) and of the fused block (`fused_block.FusedBlock`).

Backends: PyTorch's SDPA kernels (auto | flash | cudnn | efficient | math) and FlashAttention-4's CuTe kernels
(`fa4`, package flash-attn-4; Hopper and Blackwell GPUs), which take grouped heads and the (B, T, H, D)
layout the projections write, so no copy happens on the way in or out."""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from tinyllama.errors import TinyLlamaError, pip_extra

FA4_INSTALL = f"{pip_extra('fa4')} (Hopper or Blackwell GPUs)"


def _sdpa_backends(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }[name]


def fa4_problem(on_gpu: bool) -> str | None:
    """Why the `fa4` backend cannot run here (None: it can); checked when a model is switched to it."""
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return f"needs FlashAttention-4, which is not installed: {FA4_INSTALL}"
    if not on_gpu:
        return "runs on CUDA GPUs only (compute capability 9.0 or 10.x); the model is not on one"
    major = torch.cuda.get_device_capability()[0]
    if major not in (9, 10):
        return f"runs on compute capability 9.0 or 10.x; this GPU is {major}.x"
    return None


@functools.cache
def _fa4_func():
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal GQA attention, q (B, H, T, D), k/v (B, KV, T, D), through the chosen backend.

    cuDNN and the efficient kernel take no grouped heads, so k/v are repeated for them (costs memory).
    """
    if backend == "fa4":
        if not q.is_cuda:
            raise TinyLlamaError(f"attention backend 'fa4' {fa4_problem(False)}")
        # (B, T, H, D) views: contiguous when q/k/v come from the projections, as in the fused block
        y, _ = _fa4_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return y.transpose(1, 2)
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
