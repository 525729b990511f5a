"""Triton pieces shared by the layered decode kernels (decode.py) and the persistent step
(decode_persistent.py): the optional Triton import, the interpreter check, rotary embedding, one block of the
online-softmax attention, and the attention over cache splits with a last-arriver merge, rounded as the
model rounds."""

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


# The smallest cache block of the attention: the block is the inner dimension (K) of the probabilities x values
# tensor-core product, which Triton's GPU compiler refuses below 16 (its interpreter, which CI runs, takes less).
MIN_BLOCK_S = 16

if triton is not None:
    _MIN_BLOCK_S = tl.constexpr(MIN_BLOCK_S)  # as a kernel may read a global

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

    @triton.jit
    def _attention(pid, nprog, n_rows, QKV, K_CACHE, V_CACHE, ATTN, POS, COS, SIN, PART, HEAD_COUNT, cache_len,
                   scale, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, DOT_FP32: tl.constexpr):
        # Tasks (row b, kv head h, split s), s over the slots 0..pos[b] in SPLITS equal spans. The span holding
        # pos takes the new key/value from registers (rotated, and written to the cache); the others read
        # cache slots below pos. Each writes its online-softmax state (acc, max, sum) for the head's GROUP
        # query rows; the head's last split to arrive merges them in split order. decode._decode_attention_kernel
        # is the same computation in one program per head. Used by the persistent step (a share of its
        # programs) and by decode._split_attention_kernel (one program per task).
        tl.static_assert(BLOCK_S >= _MIN_BLOCK_S, "cache blocks (BLOCK_S) must be at least 16 slots (MIN_BLOCK_S)")
        dt = ATTN.dtype.element_ty
        GROUP: tl.constexpr = HQ // HKV
        HALF: tl.constexpr = HD // 2
        WIDTH: tl.constexpr = (HQ + 2 * HKV) * HD
        STATE: tl.constexpr = BLOCK_G * (HD + 2)  # one task's partial: acc (BLOCK_G, HD), max, sum
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        d = tl.arange(0, HD)
        d_swapped = (d + HALF) % HD
        sign = tl.where(d < HALF, -1.0, 1.0)
        op = tl.float32 if DOT_FP32 else dt
        for task in range(pid, n_rows * HKV * SPLITS, nprog):
            s = task % SPLITS
            h = (task // SPLITS) % HKV
            b = task // (SPLITS * HKV)
            pos = tl.load(POS + b)
            span = (pos + SPLITS) // SPLITS  # ceil((pos + 1) / SPLITS)
            start = s * span
            end = tl.minimum(pos + 1, start + span)
            row = QKV + b * WIDTH
            c = tl.load(COS + pos * HD + d).to(dt).to(tl.float32)
            sn = tl.load(SIN + pos * HD + d).to(dt).to(tl.float32)
            q_rows = row + (h * GROUP + g)[:, None] * HD
            q = tl.load(q_rows + d[None, :], mask=g_ok[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
            q_sw = tl.load(q_rows + d_swapped[None, :], mask=g_ok[:, None], other=0.0,
                           cache_modifier=".cg").to(tl.float32)
            q = _rope(q, q_sw, c[None, :], sn[None, :], sign[None, :], dt)
            k_at = row + HQ * HD + h * HD
            k = _rope(tl.load(k_at + d, cache_modifier=".cg").to(tl.float32),
                      tl.load(k_at + d_swapped, cache_modifier=".cg").to(tl.float32), c, sn, sign, dt)
            v = tl.load(row + (HQ + HKV) * HD + h * HD + d, cache_modifier=".cg")
            kc = K_CACHE + (b.to(tl.int64) * HKV + h) * cache_len * HD
            vc = V_CACHE + (b.to(tl.int64) * HKV + h) * cache_len * HD
            has_new = (start <= pos) & (pos < end)
            new_d = d < tl.where(has_new, HD, 0)  # (a scalar & a vector mask: int32 under the interpreter)
            tl.store(kc + pos * HD + d, k.to(dt), mask=new_d)
            tl.store(vc + pos * HD + d, v, mask=new_d)
            m_new = tl.sum(q * k[None, :], axis=1).to(dt).to(tl.float32) * scale
            m = tl.where(has_new, m_new, float("-inf"))
            l = tl.where(has_new, 1.0, 0.0) + tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.where(has_new, 1.0, 0.0) * v.to(tl.float32)[None, :] + tl.zeros([BLOCK_G, HD], tl.float32)
            q_op = q.to(dt).to(op)
            stop = tl.minimum(end, pos)  # the cache's slots: the new one came from registers
            for blk0 in range(start, stop, BLOCK_S):
                blk = blk0 + tl.arange(0, BLOCK_S)
                ok = blk < stop
                kt = tl.load(kc + blk[None, :] * HD + d[:, None], mask=ok[None, :], other=0.0)  # (HD, S)
                vv = tl.load(vc + blk[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)  # (S, HD)
                m, l, acc = _attend_block(q_op, kt, vv, ok, m, l, acc, scale, dt, op, DOT_FP32)
            state = PART + ((b * HKV + h) * SPLITS + s) * STATE
            tl.store(state + g[:, None] * HD + d[None, :], acc)
            tl.store(state + BLOCK_G * HD + g, m)
            tl.store(state + BLOCK_G * HD + BLOCK_G + g, l)
            tl.debug_barrier()
            counter = HEAD_COUNT + b * HKV + h
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:  # the head's last split: merge (an empty split has max -inf, sum 0)
                first = PART + (b * HKV + h) * SPLITS * STATE
                top = tl.full([BLOCK_G], float("-inf"), tl.float32)
                for i in tl.static_range(SPLITS):
                    top = tl.maximum(top, tl.load(first + i * STATE + BLOCK_G * HD + g, cache_modifier=".cg"))
                total = tl.zeros([BLOCK_G], dtype=tl.float32)
                out = tl.zeros([BLOCK_G, HD], dtype=tl.float32)
                for i in tl.static_range(SPLITS):
                    weight = tl.exp(tl.load(first + i * STATE + BLOCK_G * HD + g, cache_modifier=".cg") - top)
                    total += weight * tl.load(first + i * STATE + BLOCK_G * HD + BLOCK_G + g, cache_modifier=".cg")
                    out += weight[:, None] * tl.load(first + i * STATE + g[:, None] * HD + d[None, :],
                                                     cache_modifier=".cg")
                dst = ATTN + b * (HQ * HD) + (h * GROUP + g)[:, None] * HD + d[None, :]
                tl.store(dst, (out / total[:, None]).to(dt), mask=g_ok[:, None])
                tl.atomic_xchg(counter, 0)  # ready for the next layer
