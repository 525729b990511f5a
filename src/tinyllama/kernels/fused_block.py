"""The fused training block: a decoder block through three autograd functions (RMSNorm + projection, twice;
rotary; output projection, twice) that save only what backward cannot cheaply recompute.

A plain (or per-block compiled) block keeps ~0.97 GB of activations per layer for 8 × 2048 tokens of
TinyLlama-1.1B: the block input and its normalised copy, q/k/v, the attention output, the second residual and
its normalised copy, gate and up, and silu(gate)·up. This block keeps ~0.66 GB: the two residuals (plus one
fp32 per row), the rotated q/k and v, the attention output and gate|up. The normalised inputs and
silu(gate)·up are recomputed inside the backward kernels that read their inputs anyway (one extra store
each), right where the weight gradients need them. Without activation checkpointing: no matrix product
runs twice.

Also: q/k/v and gate/up are one GEMM each (the bf16 weight copies are written concatenated), weight
gradients come out of the GEMM in the weight's dtype (fp32 master weights: no bf16 copy and cast pass), the
residual adds happen in the o and down GEMMs' epilogues (addmm) and the residual's gradient is added inside
the norms' backward kernels: no separate add kernel in either direction.

Kernels: Triton on CUDA (and under TRITON_INTERPRET=1): rotary here, RMSNorm and SwiGLU shared with
`triton_ops`; the same maths in plain PyTorch elsewhere, which is the reference tests/test_kernels.py
compares the kernels with. The block as a whole is compared with
`tinyllama.model.Block`, forward and backward.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from tinyllama.kernels.attention import causal_attention
from tinyllama.kernels.matmul import weight_grad
from tinyllama.kernels.triton_ops import _rows
from tinyllama.model import Block, rotate_half

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl

    from tinyllama.kernels.triton_ops import rms_norm_bwd_rows, rms_norm_fwd_rows, swiglu_bwd_rows, swiglu_fwd_rows
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor, impl: str = "auto") -> bool:
    """Whether `t`'s kernels run through Triton: impl 'triton', 'torch', or 'auto' (CUDA or the interpreter)."""
    if impl == "torch" or triton is None:
        if impl == "triton":
            raise RuntimeError("Triton is not installed: these kernels need it (pip install triton)")
        return False
    return impl == "triton" or t.is_cuda or _INTERPRET


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---- kernels -------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _qkv_rope_kernel(PACKED, Q, K, V, COS, SIN, seq_len, stride_row, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b,
                         sv_t, sv_h, N_Q: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        # One program per token. Forward: its packed q/k/v row -> q and k rotated, and v, (B, T, heads, D).
        # Backward: the gradients of q, k, v (any strides) -> the packed row's gradient; the rotation's
        # transpose is the rotation by the opposite angle, v's gradient is copied. cos/sin rows hold their
        # first half twice (rope_cache's layout): the first half is read.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        t = pid % seq_len
        half: tl.constexpr = HEAD_DIM // 2
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]  # BLOCK_D: half the head dim, rounded up to a power of two
        in_d = d < half
        valid = (h < N_Q + 2 * N_KV) & in_d
        rot = h < N_Q + N_KV
        is_q = (h < N_Q) & in_d
        is_k = (h >= N_Q) & rot & in_d
        is_v = (h >= N_Q + N_KV) & valid
        packed = PACKED + pid * stride_row + h * HEAD_DIM + d
        q = Q + b * sq_b + t * sq_t + h * sq_h + d
        k = K + b * sk_b + t * sk_t + (h - N_Q) * sk_h + d
        v = V + b * sv_b + t * sv_t + (h - N_Q - N_KV) * sv_h + d
        c = tl.load(COS + t * HEAD_DIM + d, mask=in_d, other=0.0).to(tl.float32)
        s = tl.load(SIN + t * HEAD_DIM + d, mask=in_d, other=0.0).to(tl.float32)
        if BACKWARD:
            s = -s
            x1 = (tl.load(q, mask=is_q, other=0.0).to(tl.float32) + tl.load(k, mask=is_k, other=0.0).to(tl.float32)
                  + tl.load(v, mask=is_v, other=0.0).to(tl.float32))
            x2 = (tl.load(q + half, mask=is_q, other=0.0).to(tl.float32)
                  + tl.load(k + half, mask=is_k, other=0.0).to(tl.float32)
                  + tl.load(v + half, mask=is_v, other=0.0).to(tl.float32))
        else:
            x1 = tl.load(packed, mask=valid, other=0.0).to(tl.float32)
            x2 = tl.load(packed + half, mask=valid, other=0.0).to(tl.float32)
        y1 = tl.where(rot, x1 * c - x2 * s, x1)
        y2 = tl.where(rot, x2 * c + x1 * s, x2)
        if BACKWARD:
            tl.store(packed, y1.to(PACKED.dtype.element_ty), mask=valid)
            tl.store(packed + half, y2.to(PACKED.dtype.element_ty), mask=valid)
        else:
            y1 = y1.to(Q.dtype.element_ty)
            y2 = y2.to(Q.dtype.element_ty)
            tl.store(q, y1, mask=is_q)
            tl.store(q + half, y2, mask=is_q)
            tl.store(k, y1, mask=is_k)
            tl.store(k + half, y2, mask=is_k)
            tl.store(v, y1, mask=is_v)
            tl.store(v + half, y2, mask=is_v)


# ---- the ops, each a Triton kernel or its plain-PyTorch reference -------------------------------


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, impl: str = "auto",
                  copy_out: Optional[torch.Tensor] = None):
    """(h, rstd) for rows x (N, C): h = RMSNorm(x)·weight in out_dtype, rstd fp32 (N,). copy_out (N, C): x is
    also copied into it, by the kernel that reads x anyway."""
    if not use_triton(x, impl):
        if copy_out is not None:
            copy_out.copy_(x)
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
        return (weight * (x32 * rstd[:, None]).to(x.dtype)).to(out_dtype), rstd
    return rms_norm_fwd_rows(x, weight, eps, out_dtype, copy_out=copy_out)


def rms_norm_backward(dh: torch.Tensor, s: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                      dres: Optional[torch.Tensor], h_dtype: torch.dtype, impl: str = "auto"):
    """(ds, h, dweight) for rows s (N, C), the norm's input, and dh, its output's gradient: the gradient of s
    (plus the residual stream's gradient dres), the forward's h recomputed bit for bit, and the norm
    weight's gradient (fp32)."""
    if not use_triton(s, impl):
        s32 = s.float()
        xhat = s32 * rstd[:, None]
        xn = xhat.to(s.dtype)
        h = (weight * xn).to(h_dtype)
        dh32 = dh.float()
        dw = (dh32 * xn.float()).sum(0)
        g = dh32 * weight.float()
        ds = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        if dres is not None:
            ds = ds + dres.float()
        return ds.to(s.dtype), h, dw
    return rms_norm_bwd_rows(dh, s, rstd, weight, dres, h_dtype)


def _launch_qkv_rope(packed, q, k, v, cos, sin, backward: bool) -> None:
    B, T, n_q, D = q.shape
    n_kv = k.shape[2]
    _qkv_rope_kernel[(B * T,)](packed, q, k, v, cos, sin, T, packed.stride(0), *q.stride()[:3], *k.stride()[:3],
                               *v.stride()[:3], N_Q=n_q, N_KV=n_kv, HEAD_DIM=D,
                               BLOCK_H=triton.next_power_of_2(n_q + 2 * n_kv), BLOCK_D=triton.next_power_of_2(D // 2),
                               BACKWARD=backward, num_warps=4)


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int, head_dim: int,
             impl: str = "auto"):
    """qkv (B, T, (n_q + 2 n_kv)·D) -> q (B, T, n_q, D) and k (B, T, n_kv, D) rotated, v (B, T, n_kv, D)."""
    B, T, _ = qkv.shape
    if not use_triton(qkv, impl):
        q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        c, s = cos[None, :, None, :], sin[None, :, None, :]

        def rot(x):
            return x * c + rotate_half(x) * s

        return (rot(q.reshape(B, T, n_q, head_dim)).contiguous(), rot(k.reshape(B, T, n_kv, head_dim)).contiguous(),
                v.reshape(B, T, n_kv, head_dim).contiguous())
    qkv2 = _rows(qkv)
    q = torch.empty((B, T, n_q, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((B, T, n_kv, head_dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    _launch_qkv_rope(qkv2, q, k, v, cos, sin, backward=False)
    return q, k, v


def qkv_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      impl: str = "auto") -> torch.Tensor:
    """The gradient of qkv (B, T, (n_q + 2 n_kv)·D) from those of q, k, v (B, T, heads, D), any strides."""
    B, T, n_q, D = dq.shape
    n_kv = dk.shape[2]
    if not use_triton(dq, impl):
        c, s = cos[None, :, None, :], sin[None, :, None, :]

        def unrot(g):
            return g * c - rotate_half(g) * s

        return torch.cat([unrot(dq).reshape(B, T, -1), unrot(dk).reshape(B, T, -1), dv.reshape(B, T, -1)], dim=-1)
    dq, dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv))
    dqkv = torch.empty((B, T, (n_q + 2 * n_kv) * D), dtype=dq.dtype, device=dq.device)
    _launch_qkv_rope(dqkv.view(B * T, -1), dq, dk, dv, cos, sin, backward=True)
    return dqkv


def swiglu_rows(gu: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gu (N, 2F) = [gate | up] -> silu(gate)·up (N, F)."""
    n = gu.shape[1] // 2
    if not use_triton(gu, impl):
        g, u = gu[:, :n], gu[:, n:]
        return F.silu(g) * u
    return swiglu_fwd_rows(gu[:, :n], gu[:, n:])  # strided halves: the kernel takes row strides


def swiglu_rows_backward(da: torch.Tensor, gu: torch.Tensor, impl: str = "auto"):
    """(dgu, a): the gradient of [gate | up] and silu(gate)·up recomputed."""
    n = gu.shape[1] // 2
    if not use_triton(gu, impl):
        ct = torch.promote_types(gu.dtype, torch.float32)
        g, u, d = gu[:, :n].to(ct), gu[:, n:].to(ct), da.to(ct)
        sig = torch.sigmoid(g)
        silu = g * sig
        dgu = torch.cat([d * u * (sig + silu * (1 - sig)), d * silu], dim=1).to(gu.dtype)
        return dgu, F.silu(gu[:, :n]) * gu[:, n:]
    dgu = torch.empty_like(gu)
    a = swiglu_bwd_rows(da, gu[:, :n], gu[:, n:], dgu[:, :n], dgu[:, n:], h_dtype=gu.dtype)
    return dgu, a


def _stack_weights(weights, dtype: torch.dtype) -> torch.Tensor:
    """The weights as one (sum of rows, K) matrix in `dtype` (one cast-and-copy each)."""
    if len(weights) == 1 and weights[0].dtype == dtype:
        return weights[0]
    out = torch.empty((sum(w.shape[0] for w in weights), weights[0].shape[1]), dtype=dtype, device=weights[0].device)
    row = 0
    for w in weights:
        out[row:row + w.shape[0]].copy_(w)
        row += w.shape[0]
    return out


# ---- autograd functions --------------------------------------------------------------------------


def _add_mm(res: Optional[torch.Tensor], a: torch.Tensor, w: torch.Tensor, lead_shape,
            in_place: bool = False) -> torch.Tensor:
    """res + a @ w^T (or a @ w^T), shaped (*lead_shape, w rows), the add in the GEMM's epilogue when the
    residual has the product's dtype. Written into a tensor of the final shape: not a view (FSDP2 hooks
    a block's output and warns about views). in_place (res in the product's dtype, contiguous): into res
    itself. Otherwise addmm's CUDA path first copies res into its output (its C and D are one buffer)."""
    if in_place:
        _rows(res).addmm_(a, w.t())
        return res
    dtype = a.dtype if res is None else torch.promote_types(res.dtype, a.dtype)
    out = torch.empty((*lead_shape, w.shape[0]), dtype=dtype, device=a.device)
    out2 = out.view(-1, w.shape[0])
    if res is None:
        torch.mm(a, w.t(), out=out2)
    elif res.dtype == a.dtype:
        torch.addmm(_rows(res), a, w.t(), out=out2)
    else:  # e.g. an fp32 residual stream under autocast
        torch.add(_rows(res), torch.mm(a, w.t()), out=out2)
    return out


class _NormProject(torch.autograd.Function):
    """(x, RMSNorm(x)·w_norm @ cat(weights)^T). Saves x, rstd and the stacked bf16 weight copy (or the weights
    themselves when already in the compute dtype). `stacked`: that copy already made (`ComputeWeights`), or
    None to cast and stack the weights here.

    x is passed through so that its gradient from the residual path arrives here and is added inside the
    norm's backward kernel (no separate add of the two gradients). When x is in the compute dtype (the bf16
    residual stream) it is passed through as a copy, written by the norm kernel that reads x anyway: the
    next residual add (`_OutProject`, `in_place`) accumulates into that copy, while x itself stays saved for
    the norm's backward. Without it addmm copies x into its output first (1.5 ms a step of `memcpy128` at
    1.1B, 8 × 2048, H200)."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, impl, stacked, *weights):
        cdt = _compute_dtype(x)
        x2 = _rows(x)
        x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if _owned_residual(x, cdt) else x
        h, rstd = rms_norm_rows(x2, norm_weight, eps, cdt, impl, None if x_out is x else x_out.view(x2.shape))
        w = stacked if stacked is not None else _stack_weights(weights, cdt)
        out = _add_mm(None, h, w, x.shape[:-1])
        # Weights already in the compute dtype (FSDP2's bf16 ones) are saved as they are and stacked again in
        # backward: saving the stack would keep a second copy of memory FSDP2 holds anyway. fp32 master
        # weights: the stacked bf16 copy is what autocast would keep for backward too.
        ctx.restack = stacked is None and all(t.dtype == cdt for t in weights) and len(weights) > 1
        ctx.save_for_backward(x2, rstd, norm_weight, *(weights if ctx.restack else (w,)))
        ctx.impl, ctx.cdt, ctx.shape = impl, cdt, x.shape
        ctx.rows = [t.shape[0] for t in weights]
        ctx.w_dtypes = [t.dtype for t in weights]
        return x_out, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dx_residual, dout):
        x2, rstd, norm_weight, *ws = ctx.saved_tensors
        w = _stack_weights(ws, ctx.cdt) if ctx.restack else ws[0]
        dout = _rows(dout)
        dh = torch.mm(dout.to(w.dtype), w)
        dres = None if dx_residual is None else _rows(dx_residual)
        dx, h, dnorm = rms_norm_backward(dh, x2, rstd, norm_weight, dres, ctx.cdt, ctx.impl)
        if len(set(ctx.w_dtypes)) == 1:
            dws = list(weight_grad(dout.to(h.dtype), h, ctx.w_dtypes[0]).split(ctx.rows, dim=0))
        else:  # weights of different dtypes: one product each
            dws = [weight_grad(part, h, dt) for part, dt in zip(dout.split(ctx.rows, dim=1), ctx.w_dtypes)]
        return (dx.view(ctx.shape), dnorm.to(norm_weight.dtype), None, None, None, *dws)


class _QKVRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q, n_kv, head_dim, impl):
        ctx.save_for_backward(cos, sin)
        ctx.impl = impl
        return qkv_rope(qkv, cos, sin, n_q, n_kv, head_dim, impl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return qkv_rope_backward(dq, dk, dv, cos, sin, ctx.impl), None, None, None, None, None, None


def _owned_residual(x: torch.Tensor, cdt: torch.dtype) -> bool:
    """Whether `_NormProject` hands on a copy of the residual x for the next add to accumulate into in place:
    x in the compute dtype (an add into it is addmm's epilogue), contiguous rows."""
    return x.dtype == cdt and x.is_contiguous()


class _OutProject(torch.autograd.Function):
    """residual + f(x) @ w^T for the block's two output projections: f is the identity (o) or, with `swiglu`,
    silu(gate)·up of x = [gate | up] (down; saves x and recomputes silu(gate)·up in backward). In the
    compute dtype; the weight's gradient in its own dtype straight from the GEMM. from_norm: the residual is
    `_NormProject`'s output, so when `_owned_residual` it is the norm's copy, which nothing else holds: the sum
    is accumulated into it (marked dirty). `w_compute`: the weight's compute-dtype copy already made, or None."""

    @staticmethod
    def forward(ctx, x, weight, residual, swiglu, impl, from_norm=False, w_compute=None):
        cdt = _compute_dtype(x)
        x2 = _rows(x).to(cdt)
        a = swiglu_rows(x2, impl) if swiglu else x2
        w = w_compute if w_compute is not None else weight.to(cdt)
        ctx.save_for_backward(x2, w)
        ctx.w_dtype, ctx.res_dtype, ctx.swiglu, ctx.impl = weight.dtype, residual.dtype, swiglu, impl
        in_place = from_norm and _owned_residual(residual, cdt)
        if in_place:
            ctx.mark_dirty(residual)
        return _add_mm(residual, a, w, x.shape[:-1], in_place)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = _rows(dy).to(w.dtype)
        da = torch.mm(dy2, w)
        dx, a = swiglu_rows_backward(da, x2, ctx.impl) if ctx.swiglu else (da, x2)
        return (dx.view(*dy.shape[:-1], x2.shape[1]), weight_grad(dy2, a, ctx.w_dtype), dy.to(ctx.res_dtype), None,
                None, None, None)


# ---- the block -----------------------------------------------------------------------------------


class FusedBlock(Block):
    """`tinyllama.model.Block` with the training pass through the functions above.

    Same parameters, names and function (up to rounding order). Passes with a KV cache, a mask or
    per-row rotary positions (generation, padded batches) take the plain block's path.
    """

    attention_backend: str = "auto"
    kernel_impl: str = "auto"  # 'auto' (Triton on CUDA), 'triton' or 'torch' (the reference maths)
    # persistent compute-dtype copies of the projection weights (`kernels.weight_copies`), or None: cast each pass
    compute_weights = None

    def projection_groups(self) -> list[tuple]:
        """The weights each GEMM reads, stacked in this order: q/k/v, o, gate/up, down."""
        attn, mlp = self.self_attn, self.mlp
        return [(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), (attn.o_proj.weight,),
                (mlp.gate_proj.weight, mlp.up_proj.weight), (mlp.down_proj.weight,)]

    def forward(self, x, cos, sin, input_pos=None, mask=None, slots=None):
        attn, mlp = self.self_attn, self.mlp
        if input_pos is not None or mask is not None or attn.kv_cache is not None or cos.dim() != 2:
            return super().forward(x, cos, sin, input_pos, mask, slots)
        B, T, _ = x.shape
        impl = self.kernel_impl
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        qkv_w, o_w, gu_w, down_w = self._compute_copies(x)
        # The residual stream goes through each function: the adds happen in the GEMM epilogues (addmm), into
        # the norm's copy of the residual when it made one, and the residual's gradient is added inside the
        # norms' backward kernels.
        x, qkv = _NormProject.apply(x, n1.weight, n1.eps, impl, qkv_w, attn.q_proj.weight, attn.k_proj.weight,
                                    attn.v_proj.weight)
        q, k, v = _QKVRope.apply(qkv, cos.contiguous(), sin.contiguous(), attn.n_heads, attn.n_kv_heads,
                                 attn.head_dim, impl)
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.attention_backend)
        x = _OutProject.apply(y.transpose(1, 2).reshape(B, T, -1), attn.o_proj.weight, x, False, impl, True, o_w)
        x, gu = _NormProject.apply(x, n2.weight, n2.eps, impl, gu_w, mlp.gate_proj.weight, mlp.up_proj.weight)
        return _OutProject.apply(gu, mlp.down_proj.weight, x, True, impl, True, down_w)

    def _compute_copies(self, x) -> list:
        """Each GEMM's weight copy from `compute_weights` when it holds them in this pass's compute dtype (current:
        re-cast if a weight changed), else None each (the functions cast)."""
        copies = self.compute_weights
        groups = self.projection_groups()
        if copies is None or copies.dtype != _compute_dtype(x):
            return [None] * len(groups)
        return [copies.get(g) for g in groups]
