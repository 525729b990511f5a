"""Triton pieces shared by the layered decode kernels (decode.py) and the persistent step
(decode_persistent.py): the optional Triton import, the interpreter check, rotary embedding and one block of
the online-softmax attention, rounded as the model rounds."""

from __future__ import annotations

import os

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rope(x, x_swapped, c, s, sign, dt: tl.constexpr):
        # x*cos + rotate_half(x)*sin, rotate_half(x) = sign * x_swapped (halves exchanged, the first negated);
        # each product and the sum rounded to dt, as the model computes it
        a = (x * c).to(dt).to(tl.float32)
        b = (sign * x_swapped * s).to(dt).to(tl.float32)
        return (a + b).to(dt).to(tl.float32)

    @triton.jit
    def _attend_block(q, kt, vv, ok, m, l, acc, scale, dt: tl.constexpr, op: tl.constexpr, DOT_FP32: tl.constexpr):
        # one block of cached keys (D, S) and values (S, D) into the online softmax (m, l, acc); slots with
        # ok False are masked (all False: no change, as exp(-inf) = 0 and alpha = 1)
        if DOT_FP32:
            sc = tl.dot(q, kt.to(op), input_precision="ieee")
        else:
            sc = tl.dot(q, kt)
        sc = tl.where(ok[None, :], sc.to(dt).to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            pv = tl.dot(p.to(dt).to(op), vv.to(op), input_precision="ieee")
        else:
            pv = tl.dot(p.to(dt), vv)
        return m_new, l, acc * alpha[:, None] + pv
