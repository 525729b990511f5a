"""The decode step as Triton kernels: five per layer, each weight matrix read once per step.

Why: one decode step reads all 2.2 GB of weights to produce one token, so it is bound by memory
bandwidth and by how many kernels it runs. The compiled PyTorch step runs ~14 kernels per layer and its
cuBLAS small-M products read the weights at ~1.3-2.6 TB/s (perf/NOTES.md, decode). Here one layer is

  1. RMSNorm -> q/k/v product            x and W in one pass: the norm's 1/rms scales the sums at the end
  2. rotary -> KV-cache write -> attention over the cache, one program per kv head and its query heads
  3. o product + residual add             in place on the residual stream
  4. RMSNorm -> gate/up product -> SiLU(gate) * up
  5. down product + residual add

and the step ends with RMSNorm -> output head -> greedy token. A batch of one runs GEMV kernels (products
on the CUDA cores); a batch of 2-64 rows, each at its own position in its own cache row (a continuous batch
of the serve engine), runs the same five kernels with the products on the tensor cores (`_rows_kernel`):
each program reads its weight rows once for every row of the batch. Every tensor the step touches is allocated
once, so on CUDA `TritonDecodeStep` captures the whole step in one CUDA graph and replays it each token.
On Hopper the kernels use programmatic dependent launch: each lets the next one start as soon as it has
started itself, reads its first weight tile (the attention its first cache block) while the kernel before it
finishes, and waits (`gdc_wait`) before reading that kernel's results or writing anything.

Numerics follow the model's own eager decode step (`Llama.forward` + `one_token_attention`): fp32
accumulation, and rounding to the model dtype where the model rounds (product outputs, SiLU, rotary terms,
attention scores). Two deviations: the normalised x is not rounded before the product (1/rms is applied
to the sums; the rows kernel rounds x * norm weight to the model dtype, the tensor cores' input), and the softmax is computed online in fp32 (the eager step rounds the probabilities before
the value product). So results agree to rounding, not bit for bit; in bf16 they are as close to the fp32
model as the eager bf16 step is (tests/test_kernels_decode.py). `reference_*` functions give each
kernel's semantics in plain PyTorch; tests compare them on the GPU, and on the CPU through
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyllama.kernels import decode_persistent
from tinyllama.kernels import triton_ops
from tinyllama.kernels.decode_math import MIN_BLOCK_S, _attend_block, _attention, _interpreted, _rope, tl, triton
from tinyllama.kernels.triton_ops import gdc_wait, pdl_launch
from tinyllama.kernels.tuning_store import TuningStore


# ---- plain-PyTorch references (the kernels' semantics) --------------------------------------------
def reference_gemv(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, residual: Optional[torch.Tensor] = None, swiglu: bool = False) -> torch.Tensor:
    """x (K,) or (M, K) -> (N,) or (M, N) in x's dtype: [RMSNorm(x)] @ weight.T, then [+ residual] or
    [SiLU(gate) * up] (with swiglu, weight is (2N, K): gate rows then up rows, as `Llama.fuse_projections`
    concatenates). Each row of x is normalised on its own."""
    if norm_weight is not None:
        x32 = x.float()
        x = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, weight)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y if residual is None else residual + y


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D), cos/sin (D,) in x's dtype: the model's rotate-half rotary (`apply_rope`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def reference_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                               cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """One token at cache slot `pos` (batch 1): rotate q and k, write k and v to slot pos of the caches
    (1, KV, S, D) in place, attend over slots 0..pos. qkv (H·D + 2·KV·D,) -> (H·D,). cos/sin: the rotary
    tables' rows for this position, (D,) fp32."""
    D = k_cache.size(-1)
    dt = qkv.dtype
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D])
    c, s = cos.to(dt), sin.to(dt)
    q = reference_rope(q.view(n_heads, D), c, s)
    k = reference_rope(k.view(n_kv_heads, D), c, s)
    k_cache[0, :, pos] = k
    v_cache[0, :, pos] = v.view(n_kv_heads, D)
    keys, values = k_cache[0, :, : pos + 1], v_cache[0, :, : pos + 1]  # (KV, pos+1, D)
    qg = q.view(n_kv_heads, n_heads // n_kv_heads, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * D**-0.5  # rounded to dt first, as the model
    probs = scores.softmax(-1)
    return torch.matmul(probs, values.float()).to(dt).reshape(n_heads * D)


# ---- kernels --------------------------------------------------------------------------------------
if triton is not None:
    from tinyllama.kernels.triton_ops import _let_next_kernel_start, _wait_for_previous_kernel

    @triton.jit
    def _gemv_accumulate(acc, acc_up, ss, w, wu, X, NORM_W, k0, K, cols,
                         HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, ROWSUM: tl.constexpr):
        # ROWSUM: reduce each tile to per-row sums at once (fewer registers, more shuffles); else keep
        # (rows, BLOCK_K) partial sums and reduce once at the end
        k_ok = k0 + cols < K
        xv = tl.load(X + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_NORM:
            ss += xv * xv
            xv = xv * tl.load(NORM_W + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
        if ROWSUM:
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
            if SWIGLU:
                acc_up += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
        else:
            acc += w.to(tl.float32) * xv[None, :]
            if SWIGLU:
                acc_up += wu.to(tl.float32) * xv[None, :]
        return acc, acc_up, ss

    @triton.jit
    def _weight_rows(W, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # this program's BLOCK_N weight rows: their indices, which exist, a K-block's columns, their pointers
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        return rows, rows < N, cols, W + rows[:, None].to(tl.int64) * K

    @triton.jit
    def _prefetch_l2(W, N, K, rows, row_ok, start, stop, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr):
        # Hopper's bulk L2 prefetch (`cp.async.bulk.prefetch.L2`): columns [start, stop) of each of this
        # program's weight rows (and of the up half's, with SWIGLU) are brought into L2 with no registers and
        # no wait, so the loads that follow find them there. A hint: no result depends on it. Each row's
        # range is cut into CHUNKS pieces so that the (BLOCK_N, CHUNKS) requests are spread over the threads
        # (a (BLOCK_N,) tensor smaller than the program would be repeated in every thread that holds a copy).
        # A row past N or an empty piece issues nothing. `gemv` turns it on only where each row starts
        # 16-byte aligned (a piece's size and address must be multiples of 16).
        CHUNKS: tl.constexpr = (256 + BLOCK_N - 1) // BLOCK_N
        ELEM: tl.constexpr = W.dtype.element_ty.primitive_bitwidth // 8
        lo, hi = _prefetch_pieces(start, stop, CHUNKS, 16 // ELEM)
        nbytes = tl.where(row_ok[:, None], (hi - lo)[None, :] * ELEM, 0).to(tl.int32)
        at = W + rows[:, None].to(tl.int64) * K + lo[None, :]
        _bulk_prefetch_l2(at, nbytes)
        if SWIGLU:
            _bulk_prefetch_l2(at + N * K, nbytes)

    @triton.jit
    def _prefetch_pieces(start, stop, CHUNKS: tl.constexpr, ALIGN: tl.constexpr):
        # elements [start, stop) cut into CHUNKS pieces [lo, hi) of ALIGN-element multiples (16 bytes for
        # the bulk prefetch), one per thread; a piece past stop has hi <= lo (issues nothing)
        span = tl.cdiv(tl.cdiv(stop - start, CHUNKS), ALIGN) * ALIGN
        lo = start + tl.arange(0, CHUNKS) * span
        return lo, tl.minimum(lo + span, stop)

    @triton.jit
    def _bulk_prefetch_l2(at, nbytes):
        # one `cp.async.bulk.prefetch.L2` per element: nbytes (a multiple of 16; none if <= 0) from address at
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [at.to(tl.int64), nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _first_weight_tile(W, N, K, k_start, k_end, SWIGLU: tl.constexpr, PDL: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, L2_AHEAD: tl.constexpr):
        # This program's BLOCK_N weight rows and their first tile, at column k_start of its columns
        # [k_start, k_end) (and the up half's, with SWIGLU). The tile does not depend on the previous kernel:
        # with PDL it is read while that kernel finishes, before the wait for its results; so are the
        # L2_AHEAD K-blocks after it, into L2 (`_prefetch_l2`; the loop keeps that window ahead of its loads).
        _let_next_kernel_start(PDL)
        rows, row_ok, cols, w_rows = _weight_rows(W, N, K, BLOCK_N, BLOCK_K)
        if L2_AHEAD > 0:
            window_end = tl.minimum(k_start + (L2_AHEAD + 1) * BLOCK_K, k_end)
            _prefetch_l2(W, N, K, rows, row_ok, k_start + BLOCK_K, window_end, SWIGLU, BLOCK_N)
        m = row_ok[:, None] & (k_start + cols < k_end)[None, :]
        w = tl.load(w_rows + k_start + cols[None, :], mask=m, other=0.0)
        wu = w
        if SWIGLU:
            wu = tl.load(w_rows + N * K + k_start + cols[None, :], mask=m, other=0.0)
        _wait_for_previous_kernel(PDL)
        return rows, row_ok, cols, w_rows, w, wu

    @triton.jit
    def _gemv_kernel(X, W, OUT, RES, NORM_W, N, K, eps,
                     HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWSUM: tl.constexpr):
        rows, row_ok, cols, w_rows, w, wu = _first_weight_tile(W, N, K, 0, K, SWIGLU, PDL, BLOCK_N, BLOCK_K, 0)
        dt = OUT.dtype.element_ty
        # One pass over x and W: the norm's 1/rms is a scalar, so it is applied to the sums at the end
        # (the model rounds the normalised x to its dtype first; here it stays fp32 — the only deviation).
        if ROWSUM:
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc, acc_up, ss = _gemv_accumulate(zero, zero, tl.zeros([BLOCK_K], dtype=tl.float32), w, wu, X, NORM_W,
                                           0, K, cols, HAS_NORM, SWIGLU, ROWSUM)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            m = row_ok[:, None] & (k0 + cols < K)[None, :]
            w = tl.load(w_rows + k0 + cols[None, :], mask=m, other=0.0)
            if SWIGLU:
                wu = tl.load(w_rows + N * K + k0 + cols[None, :], mask=m, other=0.0)
            acc, acc_up, ss = _gemv_accumulate(acc, acc_up, ss, w, wu, X, NORM_W, k0, K, cols, HAS_NORM, SWIGLU,
                                               ROWSUM)
        if ROWSUM:
            y = acc
        else:
            y = tl.sum(acc, axis=1)
        rstd = 1.0
        if HAS_NORM:
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            y = y * rstd
        y = y.to(dt).to(tl.float32)
        if SWIGLU:
            if ROWSUM:
                up = acc_up
            else:
                up = tl.sum(acc_up, axis=1)
            up = (up * rstd).to(dt).to(tl.float32)
            y = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32) * up
        if HAS_RES:
            y = tl.load(RES + rows, mask=row_ok, other=0.0).to(tl.float32) + y
        tl.store(OUT + rows, y.to(dt), mask=row_ok)

    @triton.jit
    def _mma(a, b, DOT_FP32: tl.constexpr):
        # a tensor-core product with fp32 accumulation; DOT_FP32: fp32 operands at full precision ("ieee", not tf32)
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _rows_accumulate(acc, acc_up, ss, w, wu, X, NORM_W, k0, M, K, k_end, ms, cols,
                         HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, DOT_FP32: tl.constexpr, SWAP: tl.constexpr):
        # one (BLOCK_M, BLOCK_K) tile of the M inputs (row stride K; columns up to k_end) against the
        # (BLOCK_N, BLOCK_K) weight tile(s), on the tensor cores in the model dtype (fp32 "ieee" for fp32 models
        # and under the interpreter). SWAP: the weight tile is the left operand, acc is (BLOCK_N, BLOCK_M)
        # (wide weight tiles, few input rows)
        k_ok = k0 + cols < k_end
        xo = tl.load(X + ms[:, None] * K + k0 + cols[None, :], mask=(ms < M)[:, None] & k_ok[None, :], other=0.0)
        if HAS_NORM:  # the tensor cores' input: x * norm weight in the model dtype (with DOT_FP32 widened again
            # in _mma, its rounding kept); without a norm, x as loaded goes straight to them
            xv = xo.to(tl.float32)
            ss += tl.sum(xv * xv, axis=1)
            xo = (xv * tl.load(NORM_W + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(w.dtype)
        if SWAP:
            acc += _mma(w, tl.trans(xo), DOT_FP32)
            if SWIGLU:
                acc_up += _mma(wu, tl.trans(xo), DOT_FP32)
        else:
            acc += _mma(xo, tl.trans(w), DOT_FP32)
            if SWIGLU:
                acc_up += _mma(xo, tl.trans(wu), DOT_FP32)
        return acc, acc_up, ss

    @triton.jit
    def _rows_epilogue(acc, acc_up, ss, OUT, RES, rows, row_ok, ms, m_ok, N, K, eps, HAS_NORM: tl.constexpr,
                       SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr):
        # the sums of all K columns, (BLOCK_M, BLOCK_N) -> 1/rms, SwiGLU, residual, written in the model dtype
        dt = OUT.dtype.element_ty
        rstd = tl.full([BLOCK_M], 1.0, tl.float32)
        if HAS_NORM:
            rstd = tl.rsqrt(ss / K + eps)
        y = (acc * rstd[:, None]).to(dt).to(tl.float32)
        if SWIGLU:
            up = (acc_up * rstd[:, None]).to(dt).to(tl.float32)
            y = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32) * up
        at = ms[:, None] * N + rows[None, :]
        ok = m_ok[:, None] & row_ok[None, :]
        if HAS_RES:
            y = tl.load(RES + at, mask=ok, other=0.0).to(tl.float32) + y
        tl.store(OUT + at, y.to(dt), mask=ok)

    @triton.jit
    def _rows_kernel(X, W, OUT, RES, NORM_W, PART, SS, COUNT, M, N, K, eps,
                     HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                     SWAP: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, DEFER: tl.constexpr,
                     L2_AHEAD: tl.constexpr):
        # `_gemv_kernel` for M > 1 input rows (a decode step of M sequences): each program reads its
        # BLOCK_N weight rows once for all M inputs, so the step still reads every weight once.
        # SPLIT_K > 1: program (n, s) sums only the s-th of SPLIT_K near-equal runs of whole K-blocks (their
        # counts differ by at most one: 16 blocks in 3 splits are 5, 5, 6, not 6, 6, 4), so that a product of
        # few weight tiles (gate/up at 64 rows a tile: 88 programs for 132 SMs) runs more programs. Each
        # writes its fp32 partial sums (and its rows' partial sums of squares) to PART / SS; the last of a
        # tile's SPLIT_K programs to finish (a counter per tile, COUNT, reset by that program) adds the
        # partials in the order s = 0, 1, ... (the result does not depend on which finished last) and runs
        # the epilogue. PREFETCH: the first weight tile is read before the wait for the previous kernel
        # (PDL), outside the loop; else every tile goes through the loop's pipeline. DEFER (no norm or SwiGLU
        # here): only the partial sums are written, (SPLIT_K, BLOCK_M, N); the next kernel adds them up in the
        # same order as it reads them (`PartialSums`), so no program waits for the others. L2_AHEAD > 0: the
        # next L2_AHEAD K-blocks of the weight rows are prefetched into L2 before the wait, and the loop keeps
        # that window ahead of its loads (`_prefetch_l2`).
        pid_k = tl.program_id(1)
        k_blocks = tl.cdiv(K, BLOCK_K)
        k_start = (pid_k * k_blocks // SPLIT_K) * BLOCK_K
        k_end = tl.minimum(K, ((pid_k + 1) * k_blocks // SPLIT_K) * BLOCK_K)
        ms = tl.arange(0, BLOCK_M)
        m_ok = ms < M
        if SWAP:
            zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            rows, row_ok, cols, w_rows, w, wu = _first_weight_tile(W, N, K, k_start, k_end, SWIGLU, PDL, BLOCK_N,
                                                                   BLOCK_K, L2_AHEAD)
            acc, acc_up, ss = _rows_accumulate(zero, zero, tl.zeros([BLOCK_M], dtype=tl.float32), w, wu, X,
                                               NORM_W, k_start, M, K, k_end, ms, cols, HAS_NORM, SWIGLU, DOT_FP32,
                                               SWAP)
            k_loop = k_start + BLOCK_K
        else:
            _let_next_kernel_start(PDL)
            rows, row_ok, cols, w_rows = _weight_rows(W, N, K, BLOCK_N, BLOCK_K)
            if L2_AHEAD > 0:
                _prefetch_l2(W, N, K, rows, row_ok, k_start, tl.minimum(k_start + L2_AHEAD * BLOCK_K, k_end), SWIGLU,
                             BLOCK_N)
            _wait_for_previous_kernel(PDL)
            acc, acc_up, ss = zero, zero, tl.zeros([BLOCK_M], dtype=tl.float32)
            k_loop = k_start
        for k0 in range(k_loop, k_end, BLOCK_K):
            if L2_AHEAD > 0:  # the block L2_AHEAD past this one, into L2 (the window before the wait ends there)
                ahead = k0 + L2_AHEAD * BLOCK_K
                _prefetch_l2(W, N, K, rows, row_ok, ahead, tl.minimum(ahead + BLOCK_K, k_end), SWIGLU, BLOCK_N)
            m = row_ok[:, None] & (k0 + cols < k_end)[None, :]
            w = tl.load(w_rows + k0 + cols[None, :], mask=m, other=0.0)
            wu = w
            if SWIGLU:
                wu = tl.load(w_rows + N * K + k0 + cols[None, :], mask=m, other=0.0)
            acc, acc_up, ss = _rows_accumulate(acc, acc_up, ss, w, wu, X, NORM_W, k0, M, K, k_end, ms, cols,
                                               HAS_NORM, SWIGLU, DOT_FP32, SWAP)
        if SWAP:
            acc = tl.trans(acc)
            acc_up = tl.trans(acc_up)
        if SPLIT_K == 1 and not DEFER:
            _rows_epilogue(acc, acc_up, ss, OUT, RES, rows, row_ok, ms, m_ok, N, K, eps, HAS_NORM, SWIGLU, HAS_RES,
                           BLOCK_M)
        else:
            pid_n = tl.program_id(0)
            width = 2 * N if SWIGLU else N  # PART: (SPLIT_K, BLOCK_M, width) fp32, the up sums at column N + n
            at = ms[:, None] * width + rows[None, :]
            ok = m_ok[:, None] & row_ok[None, :]
            slab = BLOCK_M * width
            tl.store(PART + pid_k * slab + at, acc, mask=ok)
            if SWIGLU:
                tl.store(PART + pid_k * slab + N + at, acc_up, mask=ok)
            if HAS_NORM:
                tl.store(SS + (pid_n * SPLIT_K + pid_k) * BLOCK_M + ms, ss)
            if not DEFER:
                tl.debug_barrier()  # every thread's partials stored before the counter says so
                arrived = tl.atomic_add(COUNT + pid_n, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLIT_K - 1:
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    acc_up = acc
                    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
                    for s in tl.static_range(SPLIT_K):  # ".cg": from L2, where the other SMs' stores are
                        acc += tl.load(PART + s * slab + at, mask=ok, other=0.0, cache_modifier=".cg")
                        if SWIGLU:
                            acc_up += tl.load(PART + s * slab + N + at, mask=ok, other=0.0, cache_modifier=".cg")
                        if HAS_NORM:
                            ss += tl.load(SS + (pid_n * SPLIT_K + s) * BLOCK_M + ms, cache_modifier=".cg")
                    tl.atomic_xchg(COUNT + pid_n, 0)  # ready for the next product (or graph replay)
                    _rows_epilogue(acc, acc_up, ss, OUT, RES, rows, row_ok, ms, m_ok, N, K, eps, HAS_NORM, SWIGLU,
                                   HAS_RES, BLOCK_M)

    @triton.jit
    def _load_sums(at, mask, QKV_SPLITS: tl.constexpr, split_stride, dt: tl.constexpr):
        # q/k/v values at `at`: from the product's output (QKV_SPLITS 0), or the sum of its QKV_SPLITS fp32
        # partial sums (`split_stride` apart), added in split order and rounded as its epilogue would
        if QKV_SPLITS == 0:
            return tl.load(at, mask=mask, other=0.0)
        sums = tl.zeros(at.shape, dtype=tl.float32)
        for s in tl.static_range(QKV_SPLITS):
            sums += tl.load(at + s * split_stride, mask=mask, other=0.0)
        return sums.to(dt)

    @triton.jit
    def _prefetch_cache_l2(kc, vc, start, stop, HEAD_DIM: tl.constexpr, CHUNKS: tl.constexpr):
        # Cache slots [start, stop) of one head's keys and values (contiguous, HEAD_DIM elements a slot) into
        # L2 with Hopper's bulk prefetch: no registers, no wait. Cut into CHUNKS pieces (`_prefetch_pieces`,
        # one per thread: a smaller tensor would be repeated in every thread holding a copy); an empty piece
        # issues nothing. `decode_attention` turns it on only where a slot is a multiple of 16 bytes, 16-aligned.
        ELEM: tl.constexpr = kc.dtype.element_ty.primitive_bitwidth // 8
        lo, hi = _prefetch_pieces(start * HEAD_DIM, stop * HEAD_DIM, CHUNKS, 16 // ELEM)
        nbytes = ((hi - lo) * ELEM).to(tl.int32)
        _bulk_prefetch_l2(kc + lo, nbytes)
        _bulk_prefetch_l2(vc + lo, nbytes)

    @triton.jit
    def _decode_attention_kernel(QKV, K_CACHE, V_CACHE, OUT, POS, COS, SIN, cache_len, scale, split_stride,
                                 N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr,
                                 PDL: tl.constexpr, QKV_SPLITS: tl.constexpr, L2_CHUNKS: tl.constexpr = 0):
        # One program per key/value head and its GROUP query heads (rows of the tile, padded to BLOCK_G >=
        # 16 for the tensor-core products) and per batch row b (at its own position, in cache row b): each
        # cache block is read once for the whole group. QKV_SPLITS > 0: QKV holds the q/k/v product's
        # split-K partial sums (`PartialSums`), not its output. L2_CHUNKS > 0 (with PDL): the cache past the
        # first block is prefetched into L2 before the wait too, so the loop after it reads from L2.
        kv_head = tl.program_id(0)
        b = tl.program_id(1)
        QKV = QKV + b * ((N_HEADS + 2 * N_KV) * HEAD_DIM)
        OUT = OUT + b * (N_HEADS * HEAD_DIM)
        GROUP: tl.constexpr = N_HEADS // N_KV
        HALF: tl.constexpr = HEAD_DIM // 2
        dt = OUT.dtype.element_ty
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        d = tl.arange(0, HEAD_DIM)
        d_swapped = (d + HALF) % HEAD_DIM
        sign = tl.where(d < HALF, -1.0, 1.0)
        kc = K_CACHE + (b.to(tl.int64) * N_KV + kv_head) * cache_len * HEAD_DIM
        vc = V_CACHE + (b.to(tl.int64) * N_KV + kv_head) * cache_len * HEAD_DIM
        # The position, its rotary row and the cache's old slots do not depend on the previous kernel: the
        # first block of keys and values is read before waiting for it (programmatic dependent launch).
        _let_next_kernel_start(PDL)
        pos = tl.load(POS + b)
        if L2_CHUNKS > 0:
            _prefetch_cache_l2(kc, vc, BLOCK_S, pos, HEAD_DIM, L2_CHUNKS)
        c = tl.load(COS + pos * HEAD_DIM + d).to(dt).to(tl.float32)
        s = tl.load(SIN + pos * HEAD_DIM + d).to(dt).to(tl.float32)
        slots = tl.arange(0, BLOCK_S)
        ok = slots < pos
        kt = tl.load(kc + slots[None, :] * HEAD_DIM + d[:, None], mask=ok[None, :], other=0.0)  # (D, S)
        vv = tl.load(vc + slots[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)  # (S, D)
        _wait_for_previous_kernel(PDL)
        q_rows = QKV + (kv_head * GROUP + g)[:, None] * HEAD_DIM
        q = _load_sums(q_rows + d[None, :], g_ok[:, None], QKV_SPLITS, split_stride, dt).to(tl.float32)
        q_sw = _load_sums(q_rows + d_swapped[None, :], g_ok[:, None], QKV_SPLITS, split_stride, dt).to(tl.float32)
        q = _rope(q, q_sw, c[None, :], s[None, :], sign[None, :], dt)
        k_at = QKV + N_HEADS * HEAD_DIM + kv_head * HEAD_DIM
        k = _rope(_load_sums(k_at + d, d >= 0, QKV_SPLITS, split_stride, dt).to(tl.float32),
                  _load_sums(k_at + d_swapped, d >= 0, QKV_SPLITS, split_stride, dt).to(tl.float32), c, s, sign, dt)
        v = _load_sums(QKV + (N_HEADS + N_KV) * HEAD_DIM + kv_head * HEAD_DIM + d, d >= 0, QKV_SPLITS,
                       split_stride, dt)
        tl.store(kc + pos * HEAD_DIM + d, k.to(dt))
        tl.store(vc + pos * HEAD_DIM + d, v)
        # Online softmax, seeded with the new position (from registers: no read-after-write on the cache).
        # Scores are rounded to the model dtype before scaling, as the model's matmul output is.
        m = tl.sum(q * k[None, :], axis=1).to(dt).to(tl.float32) * scale
        l = tl.full([BLOCK_G], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32) + v.to(tl.float32)[None, :]
        # Products on the tensor cores in the model dtype; in fp32 ("ieee", not tf32) for fp32 models and
        # under the interpreter, whose bf16 dot is wrong (the operands are the same values either way).
        op = tl.float32 if DOT_FP32 else dt
        q_op = q.to(dt).to(op)
        m, l, acc = _attend_block(q_op, kt, vv, ok, m, l, acc, scale, dt, op, DOT_FP32)
        for start in range(BLOCK_S, pos, BLOCK_S):  # new names: the loop's int64 slots are not the int32 above
            blk = start + tl.arange(0, BLOCK_S)
            blk_ok = blk < pos
            blk_k = tl.load(kc + blk[None, :] * HEAD_DIM + d[:, None], mask=blk_ok[None, :], other=0.0)
            blk_v = tl.load(vc + blk[:, None] * HEAD_DIM + d[None, :], mask=blk_ok[:, None], other=0.0)
            m, l, acc = _attend_block(q_op, blk_k, blk_v, blk_ok, m, l, acc, scale, dt, op, DOT_FP32)
        out_rows = OUT + (kv_head * GROUP + g)[:, None] * HEAD_DIM
        tl.store(out_rows + d[None, :], (acc / l[:, None]).to(dt), mask=g_ok[:, None])


    @triton.jit
    def _split_attention_kernel(QKV, K_CACHE, V_CACHE, OUT, POS, COS, SIN, PART, COUNT, n_rows, cache_len, scale,
                                N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                                BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                                DOT_FP32: tl.constexpr, PDL: tl.constexpr):
        # The same attention over SPLITS spans of each row's cache: one program per (row, kv head, split),
        # each head's last split to finish merging the partial softmax states (decode_math._attention), so
        # a short batch keeps more than N_KV SMs reading.
        _let_next_kernel_start(PDL)
        _wait_for_previous_kernel(PDL)
        _attention(tl.program_id(0), tl.num_programs(0), n_rows, QKV, K_CACHE, V_CACHE, OUT, POS, COS, SIN, PART,
                   COUNT, cache_len, scale, N_HEADS, N_KV, HEAD_DIM, BLOCK_G, BLOCK_S, SPLITS, DOT_FP32)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    rowsum: bool = False  # the GEMV kernel: reduce each tile to per-row sums at once
    swap: bool = False  # the rows kernel: the weight tile as the left operand of the tensor-core product
    split_k: int = 1  # the rows kernel: programs per weight tile, each over 1/split_k of the columns
    # the rows kernel: read the first weight tile before waiting for the previous kernel (PDL), outside the
    # loop's pipeline (else every tile through the pipeline)
    prefetch: bool = True
    # the rows kernel, products with an RMSNorm: normalise x in a kernel of its own first (as the model does,
    # rounded to its dtype), so that the product's x tiles go straight from memory to the tensor cores
    prenorm: bool = False
    # the rows kernel, with PDL (Hopper+): K-blocks of each weight row prefetched into L2 ahead of the loads,
    # the first of them while the previous kernel finishes (0: none). `tune` tries it on each product's
    # fastest tile at 2+ rows (`L2_AHEAD_CANDIDATES`)
    l2_ahead: int = 0


@dataclass(frozen=True)
class PartialSums:
    """A split-K product's result still in pieces (`gemv(..., defer=True)`): `splits` fp32 partial sums of
    its (rows, N) output, `stride` elements apart in `part`, rows of N. The kernel that reads the result adds
    them up in split order and rounds as the product's epilogue would (the attention its q/k/v, a prenorm
    product's norm kernel the residual stream: `gemv(..., merge=)`), bit for bit what the product would have
    written. The product's programs then never wait for one another (no arrival counter, no merge tail)."""
    part: torch.Tensor
    splits: int
    stride: int


class SplitKWorkspace:
    """The rows kernel's scratch: for split-K products fp32 partial sums, partial sums of squares, and one
    arrival counter per weight tile (zero between kernels: each tile's last program resets its own); for
    deferred products their partial sums; for `prenorm` products the normalised input. Grows on demand, so
    a CUDA graph must be captured only after an eager run of the same products (as `TritonDecodeStep` does);
    the step keeps one for all its products, which run one after the other."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.part = torch.empty(0, dtype=torch.float32, device=self.device)
        self.ss = torch.empty(0, dtype=torch.float32, device=self.device)
        self.count = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.x_normed = torch.empty(0, device=self.device)
        self.x_rstd = torch.empty(0, device=self.device)
        self.deferred_part = torch.empty(0, dtype=torch.float32, device=self.device)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
        # the scratch tensor `name`, made anew (zeroed, for counters) when it is smaller or of another dtype
        buf = getattr(self, name)
        if buf.numel() < numel or buf.dtype != dtype:
            buf = (torch.zeros if zeros else torch.empty)(numel, dtype=dtype, device=self.device)
            setattr(self, name, buf)
        return buf

    def normed(self, rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """(rows, k) for the normalised input of a `prenorm` product."""
        return self._buffer("x_normed", rows * k, dtype)[:rows * k].view(rows, k)

    def rstd(self, rows: int) -> torch.Tensor:
        return self._buffer("x_rstd", rows, torch.float32)[:rows]

    def deferred(self, numel: int) -> torch.Tensor:
        """The partial sums of a deferred product (`PartialSums`): one at a time, since each is read by the
        next kernel, which finishes before any later product writes (stream order; with PDL, after its wait)."""
        return self._buffer("deferred_part", numel, torch.float32)

    def get(self, part: int, ss: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._buffer("part", part, torch.float32), self._buffer("ss", ss, torch.float32),
                self._buffer("count", tiles, torch.int32, zeros=True))


# Candidates timed once per product shape on CUDA (`TritonDecodeStep.tune`); the first is the untimed
# default. Under the interpreter (CPU tests) big blocks instead: fewer programs to interpret.
GEMV_CANDIDATES = (  # near the best for some product in an H100 sweep of 51 shapes (perf/NOTES.md, decode)
    GemvConfig(4, 2048, 4, 1),
    GemvConfig(4, 2048, 4, 3),
    GemvConfig(8, 2048, 8, 3),
    GemvConfig(8, 2048, 8, 1),
    GemvConfig(16, 1024, 8, 1),
    GemvConfig(4, 1024, 4, 3),
    GemvConfig(8, 512, 4, 3),
    GemvConfig(4, 512, 4, 1),
    GemvConfig(2, 1024, 4, 1, rowsum=True),
    GemvConfig(4, 2048, 4, 1, rowsum=True),
    GemvConfig(8, 2048, 8, 1, rowsum=True),
    GemvConfig(4, 2048, 8, 1, rowsum=True),
)
INTERPRETER_CONFIG = GemvConfig(64, 256, 4, 1)
# The same for the products of M > 1 rows (`_rows_kernel`, tensor-core tiles: block_n >= 16); the first is the
# untimed default. H200 sweep at 4-32 rows (perf/results/h200/rows_gemm.json): the swapped 64 x 256 tile was
# the fastest for q/k/v, gate/up and the output head (at 8 rows 8.7, 15.5 and 46 us, against 24, 56 and
# 184 us for 16 x 256 unswapped), 16 x 256 unswapped for o and down; whole-K tiles (16 x 2048) were 10-30x
# slower, so they are not tried. At 32 rows the swapped 64 x 256 gate/up tile with 3 stages needs ~240 KB of
# shared memory (over Hopper's 227 KB) and failed to compile: hence the 2-stage and the narrower swapped tiles
# (also more programs for q/k/v's 2,560 rows, 40 programs of 64).
ROWS_CANDIDATES = (
    GemvConfig(64, 256, 4, 3, swap=True),
    GemvConfig(64, 256, 4, 2, swap=True),
    GemvConfig(32, 256, 4, 3, swap=True),
    GemvConfig(16, 256, 4, 4, swap=True),
    GemvConfig(128, 256, 8, 3, swap=True),
    GemvConfig(64, 512, 8, 2, swap=True),
    GemvConfig(32, 512, 4, 3, swap=True),
    GemvConfig(16, 256, 4, 4),
    GemvConfig(32, 256, 4, 4),
    GemvConfig(16, 128, 4, 6),
    GemvConfig(16, 512, 4, 3),
    GemvConfig(64, 128, 4, 4),
    # split-K (2026-12-03): in the 32-row step's profile the products of few weight tiles read their weights
    # slowest (q/k/v, 40 tiles of 64 rows: 0.93 TB/s; o and down, 128 tiles of 16: 1.3 and 1.9; the head's
    # 500 tiles: 2.9). With these the H200 step went 1,500.6 -> 1,382.7 us (q/k/v 247 -> 219, the head 45 ->
    # 39; o, gate/up and down unchanged: perf/NOTES.md)
    GemvConfig(64, 256, 4, 2, swap=True, split_k=2),
    GemvConfig(64, 256, 4, 2, swap=True, split_k=4),
    GemvConfig(64, 128, 4, 4, swap=True, split_k=2),
    GemvConfig(32, 256, 4, 3, swap=True, split_k=2),
    GemvConfig(32, 256, 4, 3, swap=True, split_k=4),
    GemvConfig(16, 256, 4, 4, split_k=2),
    GemvConfig(16, 256, 4, 4, split_k=4),
    GemvConfig(16, 128, 4, 6, split_k=2),
    # Twelfth session (2026-12-07), from an H100 sweep of the 32-row products (perf/rows_product_sweep.py):
    # a minimal pipelined Triton GEMM (64 x 128 weight tiles, x straight from memory, no tile read ahead of
    # the loop) beat these candidates by 15-45 %, and by most where the norm prologue runs (q/k/v 6.4 vs
    # 11.8 us, gate/up 18.6 vs 24.8). Its shapes here, with the first tile in the loop's pipeline
    # (prefetch=False), split-K balanced to a K-block, and the norm as a kernel of its own (prenorm=True;
    # timed with that kernel, for products with a norm only).
    # Tuned on the H100 (perf/NOTES.md, twelfth session): q/k/v took the first of these, gate/up and the head
    # a prenorm tile, down the 4-split tile without prefetch; o kept its 16 x 256 tile. Step 1,577.6 -> 1,374.8 us.
    GemvConfig(64, 64, 4, 6, swap=True, split_k=3),
    GemvConfig(64, 128, 4, 4, swap=True, split_k=4),
    GemvConfig(64, 128, 4, 4, swap=True, split_k=4, prefetch=False),
    GemvConfig(64, 128, 4, 4, swap=True, split_k=2, prefetch=False),
    GemvConfig(64, 128, 4, 3, swap=True, prefetch=False),
    GemvConfig(64, 128, 4, 3, swap=True, prenorm=True),
    GemvConfig(64, 128, 4, 3, swap=True, prefetch=False, prenorm=True),
    GemvConfig(64, 128, 4, 4, swap=True, split_k=2, prefetch=False, prenorm=True),
    GemvConfig(64, 128, 4, 4, swap=True, split_k=4, prefetch=False, prenorm=True),
    GemvConfig(64, 256, 4, 4, swap=True, split_k=2, prefetch=False, prenorm=True),
    # Twenty-first session (H200): a deeper pipeline. At 32 rows gate/up runs 88 programs (one per 64 weight rows
    # of each half) and read at 2.9 TB/s with 3 stages (~64 KB of weights in flight per SM, ~5.6 MB in all: about
    # what 4.8 TB/s needs over ~1.2 us of latency), against the batch-1 GEMV's 3.7 there. With 4 stages: 347 ->
    # 327 us a step, 32 rows end to end 29.5 k -> 29.9 k tok/s (perf/NOTES.md). Tried in the same run and taken
    # out: 64 x 128 with 5 stages (did not run for gate/up; slower elsewhere), 64 x 64 with 8 (346 us), down's
    # 64 x 128 split 4 with 6 stages (176 against 170 us).
    GemvConfig(64, 128, 4, 4, swap=True, prenorm=True),
)
# Tried and taken out (seventeenth session, H100): in the deferred step gate/up times prenorm tiles only, all of 64
# weight rows (88 programs for 132 SMs at 32 rows); four narrower prenorm tiles (32 x 128, 32 x 256, 16 x 256; 64 x
# 128 split in 2: 176-352 programs) left its choice and time as they were (64 x 128, 419 us) and added ~19 s of
# tuning to every 32-row step's first call (perf/NOTES.md).
# fp32 models (tests): tiles small enough for fp32's shared memory at up to 64 rows (the bf16 first tile needs
# ~310 KB for an fp32 gate/up product, over Hopper's 227 KB)
ROWS_CANDIDATES_FP32 = (GemvConfig(16, 128, 4, 3), GemvConfig(16, 128, 4, 2), GemvConfig(32, 64, 4, 3))


class AttentionConfig(NamedTuple):
    """The step's attention: each (row, kv head) over `splits` spans of its cache in blocks of `block_s`
    slots, by programs of `num_warps` warps; l2_prefetch (unsplit, with PDL): the cache past the first block
    is prefetched into L2 before the wait for the q/k/v product (`decode_attention`)."""
    splits: int
    block_s: int
    l2_prefetch: bool = False
    num_warps: int = 4

    @property
    def name(self) -> str:
        return (f"{self.splits}x{self.block_s}" + ("+l2" if self.l2_prefetch else "")
                + (f"/w{self.num_warps}" if self.num_warps != 4 else ""))


# The step's attention candidates, timed on the first step on CUDA over every layer's cache at the step's
# positions (`TritonDecodeStep.tune`); the first is the untimed default: one program per (row, kv head).
# (1, 256): at the bench's positions (128-384) the unsplit kernel's first block, read before the PDL wait,
# then holds most or all of each row's cache (32 rows: 170 us of the H100's 1,375 us step at 1.1 TB/s).
# (1, 128, l2): the same 170 us is ~1.1 TB/s: each program has only its next block in flight after the wait
# (one program per SM); the rest of its cache, prefetched into L2 during the q/k/v product, is then near.
# Measured (H100, 32 rows, perf/NOTES.md fifteenth session): -10 % at 384 cached slots, +31-40 % from 1,024
# (the caches overflow L2), equal at one row: timed only where the generation's end is known.
# 8 warps (seventeenth session): the block of 256 read before the wait was slower than 128 with 4 warps (122.6
# against 81.2 us at 32 rows, fourteenth session): 64 KB of keys and values in 128 threads' registers is 512
# bytes a thread; 256 threads hold half that each, so the whole cache at the bench's positions may be read
# before the wait without spilling. Measured (H100, 32 rows, positions 128 and 382): 1x256/w8 chosen, 138.4 against
# 141.0 us alone, +1.7 % end to end. Taken out (nineteenth session): 1x512/w16, the whole cache up to 512 slots
# read before the wait. ptxas caps 512 threads at 128 registers (it spills 512 bytes a thread) and the H100 refused
# its launch (OutOfResources); the 8-warp blocks of 256 already use 254 registers a thread.
ATTENTION_CANDIDATES = tuple(AttentionConfig(*c) for c in (
    (1, 128), (4, 32), (8, 32), (16, 32), (8, 64), (1, 256), (1, 128, True),
    (1, 128, False, 8), (1, 256, False, 8), (1, 256, True, 8)))
# K-blocks a product's programs keep prefetched into L2 ahead of their loads (`GemvConfig.l2_ahead`), tried on
# each product's fastest tile at 2+ rows once the tiles are timed. Why: between kernels the weight stream stops; a bulk
# L2 prefetch puts bytes in flight without registers, and with PDL starts the next product's stream during
# the previous kernel. Measured (H100, perf/NOTES.md, fourteenth session): slower for every product at one
# row (qkv 106 -> 206 us) and for all but o at 32 rows, where the whole slice prefetched before the wait
# (64: more K-blocks than a program has) took 9 % off (99.5 -> 90.8 us); windows of 2 and 8 lost everywhere,
# so only the whole-slice prefetch is tried, and only by the rows kernel.
L2_AHEAD_CANDIDATES = (64,)
# The attention candidates within this fraction of the fastest alone (at most ATTENTION_STEP_MAX of them) are timed
# again in the whole step, which decides (`TritonDecodeStep._tune_attention_in_step`)
ATTENTION_STEP_MARGIN = 0.1
ATTENTION_STEP_MAX = 3
MAX_ROWS = 64  # the largest batch the Triton step takes (the rows kernel's accumulator is (rows, block_n))


def rows_shared_bytes(config: GemvConfig, rows: int, swiglu: bool, element_size: int) -> int:
    """An upper bound of the rows kernel's shared memory on sm_90: num_stages pipelined copies of its x tile
    (BLOCK_M x BLOCK_K) and weight tile(s) (BLOCK_N x BLOCK_K; two with SwiGLU), plus 1 KiB for the rest.
    (The compiler's own figure, with every argument 16-aligned as a launch's, is checked against it in CI.)"""
    block_m, block_n, block_k = max(16, triton.next_power_of_2(rows)), max(16, config.block_n), max(16, config.block_k)
    return config.num_stages * (block_m + (2 if swiglu else 1) * block_n) * block_k * element_size + 1024


def untuned_rows_config(candidates, rows: int, swiglu: bool, element_size: int, shared_limit: int) -> GemvConfig:
    """The first candidate whose tiles fit `shared_limit` bytes of shared memory (`rows_shared_bytes`): the
    step's tile for a product before (or without) tuning. The first of all was too large for gate/up's two
    tiles at 32 rows in bf16 (246,784 bytes against the H100's 232,448: an untuned step failed to launch)."""
    fitting = [c for c in candidates if rows_shared_bytes(c, rows, swiglu, element_size) <= shared_limit]
    return fitting[0] if fitting else min(candidates, key=lambda c: rows_shared_bytes(c, rows, swiglu, element_size))


def candidates_for(candidates, has_norm: bool, deferred: bool = False, defer: bool = False) -> list:
    """The tiles worth timing for a product with or without an RMSNorm: a prenorm tile differs from its twin
    only where there is a norm to take out. In a deferred step (`TritonDecodeStep.deferred`) a product with
    a norm runs it as a kernel of its own (which adds the sums its input still lacks), so only prenorm tiles
    (those that defer their sums too: every tile made prenorm)."""
    if not deferred:
        return [c for c in candidates if has_norm or not c.prenorm]
    if defer:
        tiles = [replace(c, prenorm=has_norm) for c in candidates]
        return list(dict.fromkeys(tiles))  # without the twins that differed only in prenorm
    # (a list without prenorm tiles, such as fp32's, has each made prenorm: an H100 run found none left to time)
    return [c for c in candidates if c.prenorm or not has_norm] or \
        list(dict.fromkeys(replace(c, prenorm=True) for c in candidates))


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None,
         eps: float = 1e-5, residual: Optional[torch.Tensor] = None, swiglu: bool = False,
         config: Optional[GemvConfig] = None, pdl: bool = False,
         workspace: Optional[SplitKWorkspace] = None, merge: Optional[PartialSums] = None,
         defer: bool = False):
    """The kernel behind `reference_gemv`, written into `out` (N,) or (M, N); `residual` may be `out` itself.
    x (K,) or (1, K) runs the batch-1 kernel, (M, K) with 1 < M <= MAX_ROWS the rows kernel (config: a
    GEMV_CANDIDATES or ROWS_CANDIDATES entry; default the first). pdl: launch with programmatic dependent
    launch (see `pdl_supported`): the first weight tile is read while the previous kernel on the stream
    finishes. workspace: the scratch of split-K and prenorm products; None: a new one for this call.
    Rows kernel only: `defer` (no norm in the kernel, no SwiGLU; the residual, if any, is `out`) returns the
    partial sums (`PartialSums`; one "partial" for an unsplit tile) instead of writing `out`; `merge` (a
    prenorm product whose x is the `out` of a deferred product with a residual) adds those sums into x first."""
    n = weight.size(0) // 2 if swiglu else weight.size(0)
    k = weight.size(1)
    rows = x.size(0) if x.dim() == 2 else 1
    assert weight.is_contiguous() and x.is_contiguous() and x.numel() == rows * k and out.numel() == rows * n, \
        (weight.shape, x.shape, out.shape)
    assert rows <= MAX_ROWS, f"{rows} rows: at most {MAX_ROWS}"
    common = dict(HAS_NORM=norm_weight is not None, SWIGLU=swiglu, HAS_RES=residual is not None, PDL=pdl)
    args = (x, weight, out, residual if residual is not None else out, norm_weight if norm_weight is not None else x)
    if rows == 1:
        if defer or merge is not None:
            raise ValueError("deferred split-K sums are the rows kernel's (2 or more rows), not the GEMV's")
        config = config or GEMV_CANDIDATES[0]
        _gemv_kernel[(triton.cdiv(n, config.block_n),)](
            *args, n, k, eps, **common, BLOCK_N=config.block_n, BLOCK_K=config.block_k, ROWSUM=config.rowsum,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(pdl))
    else:
        config = config or ROWS_CANDIDATES[0]
        # L2 prefetch: Hopper's bulk prefetch, which PDL implies here (sm_90+, compiled), on 16-byte-aligned rows
        aligned = (k * weight.element_size()) % 16 == 0 and weight.data_ptr() % 16 == 0
        l2_ahead = config.l2_ahead if pdl and aligned else 0
        block_m, block_n, block_k = max(16, triton.next_power_of_2(rows)), max(16, config.block_n), max(16, config.block_k)
        tiles = triton.cdiv(n, block_n)
        split = min(max(1, config.split_k), triton.cdiv(k, block_k))  # every split gets one K-block or more
        prenorm = config.prenorm and norm_weight is not None
        if merge is not None and not prenorm:
            raise ValueError("merge: the sums are added by the norm kernel of a prenorm tile (a product with a "
                             f"norm), not with {config}")
        if defer and (swiglu or (norm_weight is not None and not prenorm)
                      or (residual is not None and residual.data_ptr() != out.data_ptr())):
            raise ValueError(f"defer: a product without a norm in the kernel (a prenorm tile) or SwiGLU, the "
                             f"residual being out; not {config} (swiglu={swiglu})")
        if workspace is None and (split > 1 or prenorm or defer):
            workspace = SplitKWorkspace(x.device)
        if prenorm:  # RMSNorm(x) * weight first (x + the sums it lacks, if any, written back), then a product
            normed = workspace.normed(rows, k, x.dtype)
            triton_ops.rms_norm_fwd_rows(x.view(rows, k), norm_weight, eps, x.dtype, out=normed,
                                         rstd=workspace.rstd(rows), pdl=pdl, **({} if merge is None else dict(
                                             partials=merge.part, splits=merge.splits, split_stride=merge.stride)))
            args = (normed, *args[1:])
            common["HAS_NORM"] = False
        if defer:  # the epilogue never runs: the residual is added by whichever kernel adds the sums
            part = ss = count = workspace.deferred(split * block_m * n)
            common["HAS_RES"] = False
        elif split > 1:
            part, ss, count = workspace.get(split * block_m * (2 * n if swiglu else n), tiles * split * block_m,
                                            tiles)
        else:
            part = ss = count = out  # unused
        _rows_kernel[(tiles, split)](
            *args, part, ss, count, rows, n, k, eps, **common, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_FP32=x.dtype == torch.float32 or _interpreted(), SWAP=config.swap, SPLIT_K=split,
            PREFETCH=config.prefetch, DEFER=defer, L2_AHEAD=l2_ahead, num_warps=config.num_warps,
            num_stages=config.num_stages,
            **pdl_launch(pdl))
        if defer:
            return PartialSums(part, split, block_m * n)
    return out


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: Hopper or newer, compiled (not interpreted), Triton with gdc_*."""
    return (gdc_wait is not None and not _interpreted() and torch.device(device).type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     cos_table: torch.Tensor, sin_table: torch.Tensor, out: torch.Tensor, n_heads: int,
                     n_kv_heads: int, block_s: int = 128, num_warps: int = 4, pdl: bool = False, splits: int = 1,
                     workspace: Optional["SplitKWorkspace"] = None,
                     qkv_sums: Optional[PartialSums] = None, l2_prefetch: bool = False) -> torch.Tensor:
    """The kernel behind `reference_decode_attention`, for B rows at once: row b's token (qkv[b], of
    (B, H·D + 2·KV·D) or, for B = 1, flat) at cache position pos[b] of cache row b. pos is a (B,) integer
    tensor (so a CUDA graph can replay it for any positions), the caches (>= B, KV, S, D), cos/sin the full
    (max_len, D) fp32 tables; writes `out` (B, H·D) or, for B = 1, flat. splits > 1: each (row, kv head) over
    that many spans of its cache in parallel, merged in a fixed order (same result on every call), with the
    partial states and arrival counters in `workspace` (a SplitKWorkspace; a new one if None). qkv_sums: the
    q/k/v product was deferred (`gemv(..., defer=True)`); its partial sums are read instead of qkv (splits 1).
    l2_prefetch (splits 1; a hint, acted on with PDL where a cache slot is 16-byte aligned): each program
    prefetches its cache past the first block into L2 before waiting for the previous kernel."""
    head_dim = k_cache.size(-1)
    batch = pos.numel()
    if block_s < MIN_BLOCK_S or block_s & (block_s - 1):  # (an H100 run of blocks of 8 failed to compile)
        raise ValueError(f"decode_attention: block_s={block_s}: use a power of two >= {MIN_BLOCK_S}")
    assert k_cache.size(0) >= batch and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert qkv.is_contiguous() and qkv.numel() == batch * (n_heads + 2 * n_kv_heads) * head_dim
    assert out.is_contiguous() and out.numel() == batch * n_heads * head_dim
    block_g = max(16, triton.next_power_of_2(n_heads // n_kv_heads))
    if splits > 1:
        if qkv_sums is not None or l2_prefetch:
            raise ValueError("qkv_sums and l2_prefetch are the unsplit attention's (splits=1)")
        workspace = workspace if workspace is not None else SplitKWorkspace(qkv.device)
        part, _, count = workspace.get(batch * n_kv_heads * splits * block_g * (head_dim + 2), 0,
                                       batch * n_kv_heads)
        _split_attention_kernel[(batch * n_kv_heads * splits,)](
            qkv, k_cache, v_cache, out, pos, cos_table, sin_table, part, count, batch, k_cache.size(2),
            head_dim**-0.5, N_HEADS=n_heads, N_KV=n_kv_heads, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_S=block_s,
            SPLITS=splits, DOT_FP32=qkv.dtype == torch.float32 or _interpreted(), PDL=pdl, num_warps=num_warps,
            **pdl_launch(pdl))
        return out
    aligned = all((head_dim * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (k_cache, v_cache))
    l2_chunks = 32 * num_warps if l2_prefetch and pdl and aligned else 0  # one piece per thread
    _decode_attention_kernel[(n_kv_heads, batch)](
        qkv if qkv_sums is None else qkv_sums.part, k_cache, v_cache, out, pos, cos_table, sin_table,
        k_cache.size(2), head_dim**-0.5, 0 if qkv_sums is None else qkv_sums.stride, N_HEADS=n_heads,
        N_KV=n_kv_heads, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_S=block_s, PDL=pdl,
        DOT_FP32=qkv.dtype == torch.float32 or _interpreted(), QKV_SPLITS=0 if qkv_sums is None else qkv_sums.splits,
        L2_CHUNKS=l2_chunks, num_warps=num_warps, **pdl_launch(pdl))
    return out


# ---- the step ----------------------------------------------------------------------------------------
def unsupported_reason(model) -> Optional[str]:
    """Why `TritonDecodeStep` cannot run `model`, or None if it can."""
    if triton is None:
        return "Triton is not installed"
    device = model.embed_tokens.weight.device
    if device.type != "cuda" and not _interpreted():
        return f"the Triton decode step needs a CUDA device (the model is on {device})"
    if not model.projections_fused:
        return "the Triton decode step needs fused q/k/v and gate/up projections (Llama.fuse_projections)"
    c = model.config
    if c.head_dim < 16 or c.head_dim & (c.head_dim - 1):
        return f"head_dim {c.head_dim} is not a power of two >= 16 (the attention kernel's tensor-core tiles)"
    dtype = model.embed_tokens.weight.dtype
    for i, layer in enumerate(model.layers):
        a, m = layer.self_attn, layer.mlp
        for name, lin in (("qkv_proj", a.qkv_proj), ("o_proj", a.o_proj), ("gate_up_proj", m.gate_up_proj),
                          ("down_proj", m.down_proj)):
            if type(lin) is not nn.Linear or lin.bias is not None:
                return f"layer {i} {name} is not a plain bias-free nn.Linear (quantized?)"
            if lin.weight.dtype != dtype:
                return f"layer {i} {name} is {lin.weight.dtype}, the embeddings {dtype}: use one dtype"
    if type(model.lm_head) is not nn.Linear or model.lm_head.weight.dtype != dtype:
        return "the output head is not a plain nn.Linear in the model's dtype"
    return None


class TritonDecodeStep:
    """Decode step of a fused Llama for the first `batch_size` rows of its static KV cache (`Llama.setup_cache`),
    each row at its own position.

    `step(ids (B, 1), input_pos (1,), (B,) or (B, 1))` -> logits (B, vocab) in the model's dtype, the same
    contract as `Llama.forward(ids, input_pos=input_pos.view(B, 1))[:, -1]` (cache rows 0..B-1; input_pos of
    one element: every row at that position, as an unpadded batch with input_pos (1,)). Batch 1 runs the
    GEMV kernels, larger batches (up to MAX_ROWS) the rows kernels: each weight is read once per step either
    way. At batch 1 the whole step can instead run as one persistent kernel (persistent=True, or None to
    let `tune` time it against the layered kernels; decode_persistent.py). On CUDA the first call also picks
    each product's block shape (and with persistent=None, whether and in which configuration the persistent
    kernel runs; `tune`; tune=False keeps the first candidates), and captures the step in a CUDA graph; later
    calls copy the tokens and positions in (unless they are already there: see `greedy_token` and step's
    `pos`) and replay it. The returned logits are a fixed buffer, overwritten by the next call.
    """

    def __init__(self, model, use_graph: Optional[bool] = None, pdl: Optional[bool] = None,
                 batch_size: int = 1, tune: bool = True, persistent: Optional[bool] = False,
                 deferred: Optional[bool] = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if not 1 <= batch_size <= MAX_ROWS:
            raise ValueError(f"the Triton decode step takes batches of 1 to {MAX_ROWS} rows, not {batch_size}")
        if deferred and batch_size == 1:
            raise ValueError("deferred split-K sums need 2 or more rows (the rows kernel): batch_size=1")
        # The whole step as one persistent kernel (decode_persistent.py): True always, False never, None where
        # `tune` times it faster than the layered kernels (CUDA, batch 1). Off by default: on an H100 it ran
        # 1.15-1.3 ms per step against the layered kernels' 0.89-0.95 (perf/NOTES.md), and timing its
        # configurations would add their compiles to every engine's start.
        self.persistent_mode = persistent
        self.persistent = None  # the PersistentDecode that runs the step, when it does
        self.step_times: dict[str, float] = {}  # µs per whole step, per kernel choice (`tune`, CUDA)
        persistent_reason = decode_persistent.unsupported_reason(model, batch_size)
        if persistent and persistent_reason is not None:
            raise ValueError(persistent_reason)
        if persistent_reason is not None:
            self.persistent_mode = False
        self.batch_size = B = batch_size
        self.model = model
        c = model.config
        self.config = c
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        # Programmatic dependent launch: each kernel reads its first weight tile while the one before it
        # finishes (Hopper+; turned off again if this driver cannot capture it in a graph).
        self.pdl = pdl_supported(self.device) if pdl is None else pdl
        # batch 1: flat (N,) buffers, the GEMV kernels' form; else (B, N)
        new = lambda n: torch.empty((B, n) if B > 1 else (n,), dtype=self.dtype, device=self.device)  # noqa: E731
        self.ids = torch.zeros(B, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(B, dtype=torch.long, device=self.device)
        self.x = new(c.hidden_size)
        self.qkv = new((c.n_heads + 2 * c.n_kv_heads) * c.head_dim)
        self.attn = new(c.n_heads * c.head_dim)
        self.hidden = new(c.intermediate_size)
        self.logits = torch.empty(B, c.vocab_size, dtype=self.dtype, device=self.device)
        self._graph = None
        self._graph_cache = None  # weakref to the layer-0 KVCache the graph was captured on
        self._next_pos: Optional[int] = None  # what self.pos holds after the last step, if known
        self._tuned = not tune  # tune=False: every product at its first candidate (tests: no compile sweep)
        self.workspace = SplitKWorkspace(self.device)  # split-K scratch shared by the products (run in turn)
        # Every GEMV of the step: (input, weight, output, kwargs) over the fixed buffers.
        self.products = []
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            self.products.append((self.x, a.qkv_proj.weight, self.qkv, dict(norm_weight=n1.weight, eps=n1.eps)))
            self.products.append((self.attn, a.o_proj.weight, self.x, dict(residual=self.x)))
            self.products.append((self.x, mlp.gate_up_proj.weight, self.hidden,
                                  dict(norm_weight=n2.weight, eps=n2.eps, swiglu=True)))
            self.products.append((self.hidden, mlp.down_proj.weight, self.x, dict(residual=self.x)))
        self.products.append((self.x, model.lm_head.weight, self.logits.view(-1) if B == 1 else self.logits,
                              dict(norm_weight=model.norm.weight, eps=model.norm.eps)))
        self.product_names = ["qkv", "o", "gate_up", "down"] * len(model.layers) + ["head"]  # in that order
        self.candidates = GEMV_CANDIDATES if B == 1 else \
            ROWS_CANDIDATES_FP32 if self.dtype == torch.float32 else ROWS_CANDIDATES
        if self.device.type != "cuda":
            self.configs: list[GemvConfig] = [INTERPRETER_CONFIG] * len(self.products)
        elif B == 1:
            self.configs = [self.candidates[0]] * len(self.products)
        else:  # untuned: tiles that fit this card's shared memory
            limit = getattr(torch.cuda.get_device_properties(self.device), "shared_memory_per_block_optin", 232448)
            self.configs = [untuned_rows_config(self.candidates, B, kw.get("swiglu", False), self.x.element_size(),
                                                limit) for _, _, _, kw in self.products]
        # The deferred step (rows kernel): q/k/v, o and down write split-K partial sums that the next kernel
        # adds up as it reads them (the attention; the norm kernel of gate/up, of the next layer's q/k/v, of
        # the head), with tiles of its own (untuned: the default, its norm as a kernel of its own).
        # deferred=True always, False never, None (default): `tune` times both steps and keeps the faster
        # (H100, 32 rows: 1,336.9 -> 1,157.8 us a step; perf/NOTES.md, fourteenth session).
        self.deferred_mode = deferred if batch_size > 1 else False
        self.deferred = bool(deferred)
        self.deferring = frozenset(self._deferring())
        self.deferred_configs: list[GemvConfig] = [replace(c, prenorm=True) for c in self.configs]
        self.attention_config = ATTENTION_CANDIDATES[0]
        self.attention_times: dict[tuple, float] = {}  # µs for all layers' attention, per candidate (`tune`, CUDA)
        # µs per whole step, per attention candidate close to the fastest alone (`_tune_attention_in_step`)
        self.attention_step_times: dict[AttentionConfig, float] = {}
        self.tune_until: Optional[int] = None  # a later position the rows will reach (`step`'s last_pos)
        # µs for all layers' product of that name, its fastest tile per l2_ahead (`tune`, CUDA with PDL)
        self.l2_times: dict[str, dict[int, float]] = {}
        # µs for all layers' product of that name, per tile timed (`tune`, CUDA): what each candidate gave
        self.tile_times: dict[str, dict[GemvConfig, float]] = {}
        if persistent:
            self.persistent = decode_persistent.PersistentDecode(
                model, decode_persistent.PERSISTENT_CANDIDATES[0] if self.device.type == "cuda"
                else decode_persistent.INTERPRETER_PERSISTENT)

    def tune(self) -> None:
        """On CUDA, pick each product's block shape by timing the candidates on scratch outputs (the live
        buffers are never written). Each candidate runs over all the layers' matrices of that shape in turn,
        as the step does, so the small ones are not timed from L2 (50 MB on an H100 would hold one layer's
        q/k/v and o). Kept per card and shape for the process, and on disk for the next ones (`TUNING_STORE`:
        a kept choice is used without timing). Unless deferred=False, also the deferred
        step's tiles (`candidates_for`); with deferred=None then both whole steps (`_tune_step`)."""
        if self.device.type != "cuda":
            return
        TUNING_STORE.restore(_tuning_tables())  # what an earlier process tuned (the first call in a process)
        known = {name: len(table) for name, table in _tuning_tables().items()}
        card = torch.cuda.get_device_name(self.device)
        groups: dict[tuple, list[int]] = {}
        for i, (x, weight, out, kw) in enumerate(self.products):
            # the dtype too: fp32 takes other tiles (ROWS_CANDIDATES_FP32), and a bf16 tile may not fit its shared memory
            key = (card, self.batch_size, self.dtype, tuple(weight.shape), "norm_weight" in kw, "residual" in kw,
                   kw.get("swiglu", False), self.pdl)
            groups.setdefault(key, []).append(i)
        modes = (False, True) if self.deferred_mode is not False else (False,)  # the deferred step's tiles too
        for key, members in groups.items():
            x, _, out, kw = self.products[members[0]]
            for deferred in modes:
                defer = deferred and members[0] in self.deferring
                mode_key = key + (("deferred", defer),) if deferred else key
                if mode_key not in _TUNED:
                    xs, outs = torch.randn_like(x), torch.zeros_like(out)
                    skw = dict(kw)
                    if "residual" in skw:
                        skw["residual"] = outs
                    if "norm_weight" in skw:
                        skw["norm_weight"] = torch.ones_like(skw["norm_weight"])
                    weights = [self.products[i][1] for i in members]

                    def run_all(cfg, weights=weights, xs=xs, outs=outs, skw=skw, defer=defer):
                        for w in weights:
                            gemv(xs, w, outs, config=cfg, pdl=self.pdl, workspace=self.workspace, defer=defer, **skw)

                    best, _TILE_TIMES[mode_key] = _fastest(
                        run_all, candidates_for(self.candidates, "norm_weight" in kw, deferred, defer))
                    if self.pdl and self.batch_size > 1:  # the fastest tile, weights prefetched into L2 ahead
                        prefetching = [replace(best, l2_ahead=a) for a in L2_AHEAD_CANDIDATES]
                        best, times = _fastest(run_all, [best] + prefetching)
                        _L2_TIMES[mode_key] = {cfg.l2_ahead: t for cfg, t in times.items()}
                    _TUNED[mode_key] = best
                name = self.product_names[members[0]] + (" deferred" if deferred else "")
                if mode_key in _L2_TIMES:
                    self.l2_times[name] = _L2_TIMES[mode_key]
                if mode_key in _TILE_TIMES:
                    self.tile_times[name] = _TILE_TIMES[mode_key]
                for i in members:
                    (self.deferred_configs if deferred else self.configs)[i] = _TUNED[mode_key]
        self._tune_attention(card)
        options: list = []
        if self.persistent_mode is not False:
            options = ([None] if self.persistent_mode is None else []) + list(decode_persistent.PERSISTENT_CANDIDATES)
        elif self.deferred_mode is None and self.attention_config[0] == 1:
            options = [None, DEFERRED]  # (deferred q/k/v sums are read by the unsplit attention only)
        if options:
            self._tune_step(card, options)
        self._tune_attention_in_step(card)
        if {name: len(table) for name, table in _tuning_tables().items()} != known:
            TUNING_STORE.persist(_tuning_tables())

    def _tune_attention(self, card: str) -> None:
        """Pick the attention (`AttentionConfig`) by timing each candidate over every layer's cache at the
        rows' current positions, on scratch queries and outputs; with `tune_until` (a later position the rows
        will reach, e.g. generate's last) also there, ranked by the mean of the two: the attention's time
        grows about linearly with the position, and the step's one graph runs at all of them. (It writes
        scratch keys and values into each cache at those positions, which the step's own runs overwrite
        before anything reads them.) Kept per card, batch size, head shape and `tune_until` for the process:
        the first step's context length decides. deferred=True: the unsplit candidates only (they read the
        deferred q/k/v sums)."""
        m, c = self.model, self.config
        until = self._horizon()
        # The L2 prefetch only pays within some length (H100, 32 rows: -10 % at 384 cached slots, +31-40 % at
        # 1,024-2,000; perf/NOTES.md, fifteenth session), and at the first positions it ties the plain kernel:
        # timed only where the end is known, so noise at the start never picks it for a long generation.
        candidates = [cfg for cfg in ATTENTION_CANDIDATES
                      if (cfg.splits == 1 or self.deferred_mode is not True)
                      and (until is not None or not cfg.l2_prefetch)]
        key = (card, "attention", self.batch_size, self.dtype, self.pdl, c.n_heads, c.n_kv_heads, c.head_dim,
               tuple(candidates), until)
        if key not in _TUNED:
            qkv, out = torch.randn_like(self.qkv), torch.empty_like(self.attn)
            caches = [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in m.layers]

            def run(cfg, layers=caches) -> None:
                for k, v in layers:
                    decode_attention(qkv, k, v, self.pos, m.rope_cos, m.rope_sin, out, c.n_heads, c.n_kv_heads,
                                     pdl=self.pdl, workspace=self.workspace, **cfg._asdict())

            # A candidate is timed only if it runs and agrees here, on this card, with the one-program-per-head
            # kernel (same inputs; the split sums differ only in order). One this card's compiler or memory
            # refuses is left out too, as `time_candidates` leaves out a product's tile.
            run(candidates[0], caches[:1])
            want = out.float().clone()
            tol = 1e-4 if self.dtype == torch.float32 else 3e-2
            agreeing = [candidates[0]]
            for cfg in candidates[1:]:
                try:
                    run(cfg, caches[:1])
                except Exception as err:  # noqa: BLE001 - compile/launch errors differ by Triton version
                    warnings.warn(f"decode attention {cfg.name} fails on this GPU ({type(err).__name__}): not used")
                    continue
                if torch.allclose(out.float(), want, atol=tol, rtol=tol):
                    agreeing.append(cfg)
                else:
                    warnings.warn(f"decode attention {cfg.name} disagrees with the unsplit kernel on this GPU: "
                                  "not used")
            times = self._time_to_horizon(run, agreeing, until)
            _TUNED[key] = (min(times, key=times.get) if times else agreeing[0]), times
        self.attention_config, self.attention_times = _TUNED[key]

    def _horizon(self) -> Optional[int]:
        """The later position the tuning also times at: `tune_until` within the cache, if past the rows' own."""
        cache_len = self.model.layers[0].self_attn.kv_cache.k.size(2)
        until = None if self.tune_until is None else min(self.tune_until, cache_len - 1)
        return until if until is not None and until > int(self.pos.max()) else None

    def _time_to_horizon(self, run, candidates: list, until: Optional[int]) -> dict:
        """`time_candidates` at the rows' positions and, with `until`, the mean of that and of the times with
        every row at `until` (the positions are given back; the graphs it captures read self.pos)."""
        times = time_candidates(run, candidates)
        if until is not None and times:
            first = self.pos.clone()
            self.pos.fill_(until)
            try:
                later = time_candidates(run, list(times))
            finally:
                self.pos.copy_(first)
            times = {cfg: (t + later[cfg]) / 2 for cfg, t in times.items() if cfg in later}
        return times

    def _tune_attention_in_step(self, card: str) -> None:
        """Time again, in the whole step, the attention candidates within ATTENTION_STEP_MARGIN of the fastest
        alone (at most ATTENTION_STEP_MAX; only the unsplit ones in a deferred step), at the rows' positions and
        at `tune_until` as `_tune_attention` does, and keep the fastest step. Why: timed alone, the cache a
        candidate reads before its PDL wait overlaps only the previous layer's attention; in the step it
        overlaps the q/k/v product. (H100, 32 rows, seventeenth session: the 8-warp block of 256 was 2 %
        faster alone, and its step, replayed at position 384 in another process, 59 µs of ~1,300 faster.)"""
        if self.persistent is not None or not self.attention_times:
            return
        best = min(self.attention_times.values())
        close = [cfg for cfg, t in sorted(self.attention_times.items(), key=lambda kv: kv[1])
                 if t <= best * (1 + ATTENTION_STEP_MARGIN) and (cfg.splits == 1 or not self.deferred)]
        close = close[:ATTENTION_STEP_MAX]
        if len(close) < 2:
            return
        until = self._horizon()
        key = self._step_key(card, "step attention", self.kernels, tuple(close), until)
        if key not in _TUNED_STEP:
            chosen = self.attention_config

            def run(cfg) -> None:
                self.attention_config = cfg
                self._layers()

            try:
                times = self._time_to_horizon(run, close, until)
            finally:
                self.attention_config = chosen
            _TUNED_STEP[key] = ((min(times, key=times.get) if times else chosen),
                                {cfg: round(t, 1) for cfg, t in times.items()})
        self.attention_config, self.attention_step_times = _TUNED_STEP[key]

    def _deferring(self) -> list[int]:
        """The products whose sums a deferred step leaves to the next kernel: each layer's q/k/v, o and down."""
        return [i for i in range(len(self.products) - 1) if i % 4 != 2]

    def _use(self, option, runners: Optional[dict] = None) -> None:
        # run the step as `option` says: None the layered kernels, DEFERRED those with deferred split-K sums,
        # else a persistent configuration (its PersistentDecode from `runners` when given, else a new one)
        self.deferred = option == DEFERRED
        if option is None or option == DEFERRED:
            self.persistent = None
            return
        runners = {} if runners is None else runners
        if option not in runners:
            runners[option] = decode_persistent.PersistentDecode(self.model, option)
        self.persistent = runners[option]

    @property
    def kernels(self) -> str:
        """Which kernels run the step: "layered", "layered, split-K sums deferred" or a persistent configuration."""
        return _step_name(self.persistent.config if self.persistent is not None else
                          DEFERRED if self.deferred else None)

    @property
    def tiles(self) -> dict[str, str]:
        """Each kind of product's tile in the step as it runs (layered or deferred; the same for every layer's
        product of that kind: the tuning keys on the shape), by `product_names`."""
        configs = self.deferred_configs if self.deferred else self.configs
        return {self.product_names[i]: str(configs[i]) for i in dict.fromkeys(
            [*range(min(4, len(configs) - 1)), len(configs) - 1])}

    def _step_key(self, card: str, what: str, *choice) -> tuple:
        """A whole-step timing's key in `_TUNED_STEP`: the card, what is chosen among which `choice`, and all
        the step's tiles, rows, dtype, PDL and model shape, on which its times depend."""
        c = self.config
        return (card, what, self.batch_size, self.dtype, self.pdl, tuple(self.configs), tuple(self.deferred_configs),
                *choice, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.intermediate_size, c.vocab_size)

    def _tune_step(self, card: str, options: list) -> None:
        """Time the whole step (embedding -> logits, graph replays at the current position: idempotent) with
        each option (`_use`); keep the fastest. A persistent configuration whose launch flags a failed wait
        (`PersistentDecode.failed`) is left out."""
        key = self._step_key(card, "step", tuple(map(_step_name, options)), self.attention_config)
        if key not in _TUNED_STEP:
            runners: dict = {}

            def run(option) -> None:
                self._use(option, runners)
                self._layers()
                if self.persistent is not None and not torch.cuda.is_current_stream_capturing() \
                        and self.persistent.failed():
                    raise RuntimeError(f"persistent decode {option}: a stage wait gave up")

            choice, times = _fastest(run, options)
            _TUNED_STEP[key] = (choice, {_step_name(o): round(t, 1) for o, t in times.items()})
        choice, self.step_times = _TUNED_STEP[key]
        self._use(choice)

    # one step: one persistent kernel, or kernel by kernel ----------------------------------------------
    def _run(self) -> None:
        self._layers()
        self._advance()

    def _layers(self) -> None:
        """ids -> logits at the positions in pos (writes each layer's key/value at pos: run twice, it gives the
        same result)."""
        m, c = self.model, self.config
        torch.index_select(m.embed_tokens.weight, 0, self.ids, out=self.x.view(self.batch_size, -1))
        if self.persistent is not None:
            self.persistent.run(self)
            return
        deferring = self.deferring if self.deferred else frozenset()
        products = iter(enumerate(zip(self.products, self.deferred_configs if self.deferred else self.configs)))

        def product(merge: Optional[PartialSums] = None) -> Optional[PartialSums]:
            # the next product; the sums it leaves to the next kernel if it defers them, else None
            i, ((x, weight, out, kw), cfg) = next(products)
            sums = gemv(x, weight, out, config=cfg, pdl=self.pdl, workspace=self.workspace, merge=merge,
                        defer=i in deferring, **kw)
            return sums if i in deferring else None

        owed = None  # deferred: the sums the residual stream x still lacks (of o or down)
        for layer in m.layers:
            a = layer.self_attn
            qkv_sums = product(merge=owed)  # RMSNorm -> q/k/v
            decode_attention(self.qkv, a.kv_cache.k, a.kv_cache.v, self.pos, m.rope_cos, m.rope_sin, self.attn,
                             c.n_heads, c.n_kv_heads, pdl=self.pdl, workspace=self.workspace, qkv_sums=qkv_sums,
                             **self.attention_config._asdict())
            owed = product()  # o + residual
            product(merge=owed)  # RMSNorm -> gate/up -> SiLU(gate) * up
            owed = product()  # down + residual
        product(merge=owed)  # RMSNorm -> output head

    def _advance(self) -> None:
        # The greedy tokens become the next step's input (ids is read only by the embedding above), and the
        # positions advance: a greedy caller then copies nothing in (`greedy_token`, step's `pos`).
        torch.argmax(self.logits, dim=-1, out=self.ids)
        self.pos.add_(1)

    def _capture(self):
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run()
        return graph

    def reset(self) -> None:
        """Forget the captured graph (call when the KV cache it points into is freed)."""
        self._graph = self._graph_cache = None
        self._next_pos = None

    @torch.inference_mode()
    def replay_us(self, replays: int = 20) -> Optional[float]:
        """µs per step of up to `replays` back-to-back replays of the captured step, on from the rows' current
        positions (what a decode loop's host work and syncs add per step is the difference to the loop's
        own rate); None without a captured graph or with no cache slot left after the positions. The
        positions are put back afterwards; the replays write keys/values only into slots past them, which
        the next steps overwrite before reading. Synchronizes (a benchmark's method)."""
        cache = self.model.layers[0].self_attn.kv_cache
        if self._graph is None or cache is None or self._graph_cache() is not cache:
            return None
        start = self.pos.clone()
        n = min(replays, cache.k.size(2) - 1 - int(start.max()))  # every replayed position inside the cache
        if n < 1:
            return None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(n):
            self._graph.replay()
        end.record()
        end.synchronize()
        self.pos.copy_(start)
        self._next_pos = None  # the next step copies its positions in
        return begin.elapsed_time(end) * 1e3 / n

    def greedy_token(self) -> torch.Tensor:
        """(B, 1): the argmax of the last step's logits, computed inside the step. It is the step's own input
        buffer: passed back as the next `ids`, it needs no copy."""
        return self.ids.view(self.batch_size, 1)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, input_pos: torch.Tensor, pos: Optional[int] = None,
             last_pos: Optional[int] = None) -> torch.Tensor:
        """`pos`, if given, is input_pos as an int (every row at that position): the step then skips copying
        it in when it is the slot after the previous step's (the step advances its position buffer itself).
        `last_pos`, if known, is the last position these rows will reach (generate's prompt + new tokens):
        the first step's tuning then times the attention there too (`_tune_attention`)."""
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is None:
            raise RuntimeError("TritonDecodeStep needs the model's KV cache: setup_cache(...)")
        B = self.batch_size
        if cache.k.size(0) < B or ids.numel() != B or input_pos.numel() not in (1, B):
            raise ValueError(f"the Triton step of batch {B}: ids {tuple(ids.shape)}, input_pos "
                             f"{tuple(input_pos.shape)}, a cache of {cache.k.size(0)} rows")
        if ids.data_ptr() != self.ids.data_ptr():
            self.ids.copy_(ids.reshape(B), non_blocking=True)
        if pos is None or pos != self._next_pos:
            self.pos.copy_(input_pos.reshape(-1), non_blocking=True)  # one position: broadcast to every row
        self._next_pos = None if pos is None else pos + 1
        if not self._tuned:
            self.tune_until = last_pos
            self.tune()  # also without a graph: eager and graphed steps then run the same block shapes
            self._tuned = True
        # `Llama.setup_cache` makes new KVCache modules for every layer at once: layer 0's tells them apart.
        if self._graph_cache is None or self._graph_cache() is not cache:
            # First call for this cache: run eagerly (this step's result; compiles the kernels), check that a
            # persistent kernel's waits all held (else the layered kernels, from now on), then capture the
            # step (capturing runs nothing) for the next calls.
            self._graph = None
            self._layers()
            if self.persistent is not None and self.persistent.failed():
                warnings.warn("the persistent decode kernel's programs were not all resident at once (a stage "
                              "wait gave up): running the layered Triton kernels instead")
                self.persistent, self.persistent_mode = None, False
                self._layers()
            self._advance()
            self._graph_cache = weakref.ref(cache)
            if not self.use_graph:
                return self.logits
            try:
                graph = self._capture()
            except RuntimeError:
                if not self.pdl:
                    raise
                self.pdl = False  # this driver/runtime cannot capture programmatic launches: plain ones
                self.tune()
                graph = self._capture()
            self._graph = graph
            return self.logits
        if not self.use_graph:
            self._run()
            return self.logits
        self._graph.replay()
        return self.logits


# (card, shape, ...) -> a product's GemvConfig, or the attention's (AttentionConfig, µs per candidate)
_TUNED: dict[tuple, object] = {}
_TUNED_STEP: dict[tuple, tuple] = {}  # (card, model shape, ...) -> (step option: `_use`, µs per option)
_L2_TIMES: dict[tuple, dict] = {}  # a product's tuning key -> {l2_ahead: µs} of its fastest tile
_TILE_TIMES: dict[tuple, dict] = {}  # a product's tuning key -> {tile: µs} of every tile it timed


def _code_fingerprint() -> str:
    """What a kept tuning depends on besides its key: Triton, torch, and the decode kernels' own source (their
    code and candidate lists), so a changed kernel or list is tuned afresh."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for module in (__file__, decode_persistent.__file__, triton_ops.__file__, Path(__file__).with_name("decode_math.py")):
        digest.update(Path(module).read_bytes())
    return f"triton {getattr(triton, '__version__', '?')}, torch {torch.__version__}, kernels {digest.hexdigest()[:16]}"


# `_TUNED` and `_TUNED_STEP` kept on disk between processes (`TritonDecodeStep.tune`; bench generate times
# afresh unless --reuse-tuning)
TUNING_STORE = TuningStore("decode_tuning.json", _code_fingerprint,
                           [GemvConfig, AttentionConfig, decode_persistent.PersistentConfig])


def _tuning_tables() -> dict[str, dict]:
    return {"products and attention": _TUNED, "whole step": _TUNED_STEP}


DEFERRED = "deferred"  # a whole-step option of `TritonDecodeStep._tune_step` (see its `deferred`)


def _step_name(option) -> str:
    if option is None:
        return "layered"
    if option == DEFERRED:
        return "layered, split-K sums deferred"
    return "persistent r{0.rows} k{0.block_k}/{0.block_k_ff} w{0.num_warps} p{0.programs_per_sm} " \
           "s{0.splits} d{0.depth}".format(option)


def time_candidates(run, candidates) -> dict:
    """Median µs per call of run(cfg) for each candidate, timed as CUDA-graph replays (a Python launch takes
    longer than these kernels run, so eager timing would measure the launches). Failing candidates are left
    out."""
    times = {}
    for cfg in candidates:
        try:
            run(cfg)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run(cfg)
        except Exception:  # a config this card cannot compile or run (shared memory, registers): skip it
            continue
        graph.replay()
        samples = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        times[cfg] = sorted(samples)[len(samples) // 2]
        del graph
    return times


def _fastest(run, candidates) -> tuple:
    """The candidate with the least `time_candidates` time (the first if none ran), and all the times."""
    times = time_candidates(run, candidates)
    return (min(times, key=times.get) if times else candidates[0]), times
