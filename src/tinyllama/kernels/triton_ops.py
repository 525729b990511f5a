"""Triton kernels for the eager fast path: RMSNorm, SwiGLU and rotary embeddings, forward and backward.

Each is one pass over its tensors in each direction, computes in fp32 and stores in the input's
dtype; the plain-PyTorch references are the model's own RMSNorm / `F.silu(g) * u` / `apply_rope`
(tests/test_kernels.py compares them; on the CPU through TRITON_INTERPRET=1 when Triton is installed).
The per-block `torch.compile` path fuses the same ops and is the default; these serve eager runs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # optional: Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
try:  # programmatic dependent launch (Hopper+): Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the install
    gdc_launch_dependents = gdc_wait = None


def triton_available() -> bool:
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def pdl_launch(pdl: bool) -> dict:
    """The launch option of programmatic dependent launch (PDL): the kernel may start while the one before it
    on the stream finishes, so it must `gdc_wait` before its first dependent read and before any write."""
    return {"launch_pdl": True} if pdl else {}


def _out_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    # Under autocast the norm's only consumers are matmuls that cast to the autocast dtype: store that.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight_dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as rows (N, last dim) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


if triton is not None:

    # ---- programmatic dependent launch (the decode step's kernels, `pdl_launch`) -------------------
    @triton.jit
    def _let_next_kernel_start(PDL: tl.constexpr):
        # With programmatic dependent launch (PDL), at a kernel's start: the next kernel on the stream may be
        # scheduled as soon as every program of this one has started, so that it reads its first weight tile
        # (or cache block) while this one runs. Safe because every kernel waits (`_wait_for_previous_kernel`)
        # before its first dependent read and before any write, and a kernel completes only after its own wait:
        # the chain of completions stays in order. Measured (H100, perf/NOTES.md sixteenth session): issued
        # here rather than after the wait, the step took 5.8 % less at one row, 4-6 % less at 32 rows.
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def _wait_for_previous_kernel(PDL: tl.constexpr):
        # with PDL: wait for the previous kernel's results (x, residual), and for its own completion
        if PDL:
            gdc_wait()

    # ---- RMSNorm -----------------------------------------------------------------------------------

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, PART, COPY, stride_x, stride_y, stride_copy, n_cols, split_stride, eps,
                      BLOCK: tl.constexpr, SPLITS: tl.constexpr = 0, PDL: tl.constexpr = False,
                      STORE_COPY: tl.constexpr = False):
        # SPLITS > 0 (the decode step): x first gets a product's output it still lacks, from SPLITS fp32
        # partial sums (`split_stride` apart, rows of n_cols) added in split order: x + round(sum), rounded,
        # as the product's epilogue adds its residual; that x is written back, then normalised.
        # PDL (the decode step): launched as a dependent of the product before it, waiting for its results
        # here, and letting the product after it start (and read its first weight tile) while this one runs.
        # STORE_COPY (the fused training block): x is also written to COPY, the buffer the next residual add
        # accumulates into in place (saves a separate copy kernel's read of x).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # not the previous kernel's: before the wait
        _let_next_kernel_start(PDL)
        _wait_for_previous_kernel(PDL)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if STORE_COPY:
            tl.store(COPY + row * stride_copy + cols, x, mask=mask)
        x = x.to(tl.float32)
        if SPLITS > 0:
            sums = tl.zeros([BLOCK], dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                sums += tl.load(PART + s * split_stride + row * n_cols + cols, mask=mask, other=0.0)
            x = (x + sums.to(X.dtype.element_ty).to(tl.float32)).to(X.dtype.element_ty)
            tl.store(X + row * stride_x + cols, x, mask=mask)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        # Round the normalised value to x's dtype before scaling, as the reference (and HF) do.
        xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, DRES, H, stride_dy, stride_x, stride_dx, stride_dres, stride_h,
                      n_rows, n_cols, rows_per_prog, HAS_DRES: tl.constexpr, STORE_H: tl.constexpr,
                      BLOCK: tl.constexpr):
        # HAS_DRES: add the residual stream's gradient DRES to DX. STORE_H: also store the forward's output
        # again, bit for bit (the fused block recomputes it here for the next GEMM's weight gradient).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * rows_per_prog
        for i in range(0, rows_per_prog):
            row = (start + i).to(tl.int64)
            if row < n_rows:
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                xhat = x * rstd
                xn = xhat.to(X.dtype.element_ty).to(tl.float32)
                if STORE_H:
                    tl.store(H + row * stride_h + cols, (xn * w).to(H.dtype.element_ty), mask=mask)
                dw += dy * xn
                g = dy * w
                dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
                if HAS_DRES:
                    dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)

    def _norm_warps(block: int) -> int:
        return min(16, max(1, block // 256))

    def rms_norm_fwd_rows(x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                          out: Optional[torch.Tensor] = None, rstd: Optional[torch.Tensor] = None,
                          partials: Optional[torch.Tensor] = None, splits: int = 0, split_stride: int = 0,
                          pdl: bool = False, copy_out: Optional[torch.Tensor] = None):
        """(y, rstd) for rows x2 (N, C) with unit column stride: y = RMSNorm(x2)·weight in out_dtype (into
        `out` (N, C) and `rstd` (N,) fp32 if given: the decode step's fixed buffers). partials (the decode
        step): fp32 split-K sums still to be added to x2, `splits` of them `split_stride` elements apart,
        rows of C; x2 becomes x2 + their sum (rounded as a product's epilogue rounds) in place first.
        pdl: launched with programmatic dependent launch (`pdl_launch`; the caller checks the card).
        copy_out (N, C), x2's dtype, unit column stride: x2 is also copied into it (not with partials)."""
        if copy_out is not None and partials is not None:
            raise ValueError("copy_out and partials: the copy would be of x before the sums")
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device) if out is None else out
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device) if rstd is None else rstd
        block = triton.next_power_of_2(n_cols)
        copy = x2 if copy_out is None else copy_out
        _rms_norm_fwd[(n_rows,)](x2, weight, y, rstd, x2 if partials is None else partials, copy, x2.stride(0),
                                 y.stride(0), copy.stride(0), n_cols, split_stride, eps, BLOCK=block,
                                 SPLITS=splits if partials is not None else 0, PDL=pdl,
                                 STORE_COPY=copy_out is not None, num_warps=_norm_warps(block), **pdl_launch(pdl))
        return y, rstd

    def rms_norm_bwd_rows(dy2: torch.Tensor, x2: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                          dres: Optional[torch.Tensor] = None, h_dtype: Optional[torch.dtype] = None):
        """(dx, h, dweight fp32) for rows: dx (+ dres when given); with h_dtype, the forward's output again
        (else None)."""
        n_rows, n_cols = x2.shape
        dx = torch.empty_like(x2)
        h = None if h_dtype is None else torch.empty((n_rows, n_cols), dtype=h_dtype, device=x2.device)
        n_sm = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 8
        rows_per_prog = triton.cdiv(n_rows, min(n_rows, 4 * n_sm))
        n_progs = triton.cdiv(n_rows, rows_per_prog)
        dw_part = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n_cols)
        d = x2 if dres is None else dres
        hh = x2 if h is None else h
        _rms_norm_bwd[(n_progs,)](dy2, x2, weight, rstd, dx, dw_part, d, hh, dy2.stride(0), x2.stride(0),
                                  dx.stride(0), d.stride(0), hh.stride(0), n_rows, n_cols, rows_per_prog,
                                  HAS_DRES=dres is not None, STORE_H=h is not None, BLOCK=block,
                                  num_warps=_norm_warps(block))
        return dx, h, dw_part.sum(0)

    class _RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps, out_dtype):
            x2 = _rows(x)
            y, rstd = rms_norm_fwd_rows(x2, weight, eps, out_dtype)
            ctx.save_for_backward(x2, weight, rstd)
            ctx.shape = x.shape
            return y.view(x.shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            dx, _, dw = rms_norm_bwd_rows(_rows(dy), x2, rstd, weight)
            return dx.view(ctx.shape), dw.to(weight.dtype), None, None

    # ---- SwiGLU ------------------------------------------------------------------------------------

    @triton.jit
    def _swiglu_fwd(G, U, H, stride_g, stride_u, stride_h, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(DH, G, U, DG, DU, H, stride_dh, stride_g, stride_u, stride_d, stride_h, n_cols,
                    STORE_H: tl.constexpr, BLOCK: tl.constexpr):
        # STORE_H: also store silu(g)·u again (the fused block's down projection needs it for its weight gradient).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        if STORE_H:
            tl.store(H + row * stride_h + cols, (silu * u).to(H.dtype.element_ty), mask=mask)
        dg = dh * u * (sig + silu * (1.0 - sig))
        tl.store(DG + row * stride_d + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_d + cols, (dh * silu).to(DU.dtype.element_ty), mask=mask)

    def swiglu_fwd_rows(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """silu(g2)·u2 for rows (N, F) with unit column stride (any row strides, e.g. two halves of one tensor)."""
        n_rows, n_cols = g2.shape
        h = torch.empty((n_rows, n_cols), dtype=torch.promote_types(g2.dtype, u2.dtype), device=g2.device)
        _swiglu_fwd[(n_rows, triton.cdiv(n_cols, 1024))](g2, u2, h, g2.stride(0), u2.stride(0), h.stride(0), n_cols,
                                                         BLOCK=1024, num_warps=4)
        return h

    def swiglu_bwd_rows(dh2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                        h_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """Writes the gradients of g2 and u2 into dg and du (rows with one row stride); with h_dtype, also
        returns silu(g2)·u2 again (else None)."""
        n_rows, n_cols = g2.shape
        h = None if h_dtype is None else torch.empty((n_rows, n_cols), dtype=h_dtype, device=g2.device)
        hh = dg if h is None else h
        _swiglu_bwd[(n_rows, triton.cdiv(n_cols, 1024))](dh2, g2, u2, dg, du, hh, dh2.stride(0), g2.stride(0),
                                                         u2.stride(0), dg.stride(0), hh.stride(0), n_cols,
                                                         STORE_H=h is not None, BLOCK=1024, num_warps=4)
        return h

    class _SwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            g2, u2 = _rows(gate), _rows(up)
            ctx.save_for_backward(g2, u2)
            ctx.shapes = (gate.shape, up.shape)
            return swiglu_fwd_rows(g2, u2).view(gate.shape)

        @staticmethod
        def backward(ctx, dh):
            g2, u2 = ctx.saved_tensors
            dg, du = torch.empty_like(g2), torch.empty_like(u2)
            swiglu_bwd_rows(_rows(dh), g2, u2, dg, du)
            return dg.view(ctx.shapes[0]), du.view(ctx.shapes[1])

    # ---- rotary ------------------------------------------------------------------------------------

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, seq_len, n_heads, sign, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program per (batch, position): all heads of one token, rotate-half layout.
        pid = tl.program_id(0)
        t = pid % seq_len
        half: tl.constexpr = HEAD_DIM // 2
        heads = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, half)[None, :]
        mask = heads < n_heads
        base = pid * n_heads * HEAD_DIM + heads * HEAD_DIM + d
        x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + base + half, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + t * HEAD_DIM + d).to(tl.float32)
        s = tl.load(SIN + t * HEAD_DIM + d).to(tl.float32) * sign
        tl.store(Y + base, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + base + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)

    def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
        B, T, H, D = x.shape
        x = x.contiguous()
        y = torch.empty_like(x)
        _rope_kernel[(B * T,)](x, cos, sin, y, T, H, sign, HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H),
                               num_warps=4)
        return y

    class _Rope(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin):
            cos, sin = cos.contiguous(), sin.contiguous()
            ctx.save_for_backward(cos, sin)
            return _rope_launch(x, cos, sin, 1.0)

        @staticmethod
        def backward(ctx, dy):
            cos, sin = ctx.saved_tensors
            # The rotation's transpose is the rotation by the opposite angle.
            return _rope_launch(dy, cos, sin, -1.0), None, None


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed: these kernels need it (pip install triton)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; same result as `tinyllama.model.RMSNorm` (stored in the autocast dtype under autocast)."""
    _need_triton()
    return _RMSNorm.apply(x, weight, eps, _out_dtype(x, weight.dtype))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass; backward recomputes silu instead of storing it."""
    _need_triton()
    return _SwiGLU.apply(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, T, H, D) with cos/sin (T, D) (halves repeated), rotate-half layout."""
    _need_triton()
    if x.dim() != 4 or cos.shape != (x.shape[1], x.shape[3]):
        raise ValueError(f"rope expects x (B, T, H, D) and cos/sin (T, D); got {tuple(x.shape)} and {tuple(cos.shape)}")
    return _Rope.apply(x, cos, sin)


def self_check(device: str = "cuda") -> dict:
    """Each kernel vs its reference on fresh random bf16 inputs (forward and backward): relative errors."""
    from tinyllama.model import RMSNorm, apply_rope, rope_cache

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    out = {}
    g = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    # RMSNorm: fp32 residual input (autocast path) and bf16 input, ragged width
    for dtype, n in ((torch.float32, 2048), (torch.bfloat16, 2048), (torch.bfloat16, 1000)):
        x = torch.randn(4096, n, device=device, dtype=dtype, generator=g)
        w = 1 + 0.1 * torch.randn(n, device=device, generator=g)
        dy = torch.randn(4096, n, device=device, dtype=dtype, generator=g)
        ref = RMSNorm(n).to(device)
        ref.weight.data.copy_(w)
        xr = x.double().requires_grad_()
        yr = ref.double()(xr)
        yr.backward(dy.double())
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        ya = rms_norm(xa, wa, 1e-5)
        ya.backward(dy.to(ya.dtype))
        out[f"rms_norm {str(dtype)[6:]} {n}"] = {"y": rel(ya, yr), "dx": rel(xa.grad, xr.grad), "dw": rel(wa.grad, ref.weight.grad)}
    # SwiGLU
    gt = torch.randn(4096, 5632, device=device, dtype=torch.bfloat16, generator=g) * 2
    up = torch.randn(4096, 5632, device=device, dtype=torch.bfloat16, generator=g)
    dh = torch.randn(4096, 5632, device=device, dtype=torch.bfloat16, generator=g)
    gr, ur = gt.double().requires_grad_(), up.double().requires_grad_()
    hr = torch.nn.functional.silu(gr) * ur
    hr.backward(dh.double())
    ga, ua = gt.clone().requires_grad_(), up.clone().requires_grad_()
    ha = swiglu(ga, ua)
    ha.backward(dh)
    out["swiglu"] = {"h": rel(ha, hr), "dgate": rel(ga.grad, gr.grad), "dup": rel(ua.grad, ur.grad)}
    # rotary on (B, T, H, D) with GQA-sized heads
    cos, sin = rope_cache(2048, 64, 10000.0, device=device)
    for heads in (32, 4):
        x = torch.randn(2, 2048, heads, 64, device=device, dtype=torch.bfloat16, generator=g)
        dy = torch.randn_like(x)
        xr = x.double().requires_grad_()
        yr = apply_rope(xr.transpose(1, 2), cos.double(), sin.double()).transpose(1, 2)
        yr.backward(dy.double())
        xa = x.clone().requires_grad_()
        ya = rope(xa, cos.to(x.dtype), sin.to(x.dtype))
        ya.backward(dy)
        out[f"rope H={heads}"] = {"y": rel(ya, yr), "dx": rel(xa.grad, xr.grad)}
    return out
