"""The whole batch-1 decode step in one persistent Triton kernel.

Why: the layered Triton step (`decode.py`: five kernels per layer, 111 for the 1.1B) reads the weights at
~2.7 TB/s at batch 1 on an H200, where a copy runs at ~4.3 TB/s. Its profile shows why: each kernel pays a
fixed ~2.5 µs (launch, the first tile's latency, a tail where few programs still run) on top of its bytes,
and the small ones (q/k/v, o, attention) are mostly that. Here a single launch of programs that stay
resident (a few per SM) runs every stage of every layer:

  1. RMSNorm -> q/k/v product
  2. attention, as (kv head, cache split) tasks: rotary, the new key/value written to the cache, an online
     softmax over the split's slots; the last split of a head to finish merges the partial sums
  3. o product + residual (in place on the residual stream)
  4. RMSNorm -> gate/up product -> SiLU(gate) * up
  5. down product + residual (in place)

and then RMSNorm -> output head. A stage waits for the one before through flags in global memory instead
of a kernel boundary, and each program loads its first weight tiles of a stage (`depth`) *before* it
waits, so the weights keep streaming while the previous stage's last programs finish; inside a stage each
program loads `depth` tiles ahead of the one it multiplies.

Synchronisation: after its share of a stage every program adds 1 to that stage's counter (a barrier first,
so all its threads' stores are done, then an acquire-release atomic). The program that brings the counter
to the number of programs resets it and stores the launch's epoch + 1 into the stage's GO_LANES "go"
flags (release), 128 bytes apart: the waiting programs spin on one lane each (volatile loads, then one
acquire), so polls from hundreds of warps do not queue at one address behind the arrivals. Activations
are read with ".cg" loads (from L2: never a stale L1 line left by the previous layer's read of the same
buffer). The flags are never reset: the last program to leave advances the epoch, so the next launch (a
CUDA-graph replay) waits for new values. Every program must be resident at once for this not to deadlock,
so the grid is sized from the compiled kernel's registers and shared memory (`_resident_grid`). A wait
still unmet after SPIN_LIMIT polls sets an error flag and goes on (a wrong result instead of a hang);
`TritonDecodeStep` checks the flag after the kernel's first run and falls back to the layered kernels.
Under Triton's interpreter (CPU tests) the kernel runs as one program, which meets every wait itself, in
order. `PersistentDecode.profile` stamps the GPU clock around every stage of every program.

Numerics are the layered kernels' (decode.py's docstring): fp32 sums, rounding where the model rounds. The
attention's online softmax runs per split and the splits are merged in a fixed order, so results agree with
the layered step to fp32 rounding and are the same bits on every run.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from tinyllama.kernels.decode_math import _attention, _interpreted, tl, triton

STAGES_PER_LAYER = 8  # counter slots per layer (5 used: q/k/v, attention, o, gate/up, down)


@dataclass(frozen=True)
class PersistentConfig:
    rows: int = 4  # weight rows per tile
    block_k: int = 2048  # columns per tile of the products over the hidden size (q/k/v, o, gate/up, head)
    block_k_ff: int = 2048  # columns per tile of the down product (over the intermediate size; masked)
    num_warps: int = 4
    programs_per_sm: int = 2  # at most: fewer if the compiled kernel's registers or shared memory say so
    splits: int = 16  # cache splits per key/value head (attention tasks per head)
    block_s: int = 32  # cache slots per attention block
    depth: int = 1  # weight tiles each program loads ahead (1 or 2), the first ones before a stage's wait


# Timed on the first step on CUDA (`TritonDecodeStep.tune`, whole-step graph replays); the first is the
# untimed default.
PERSISTENT_CANDIDATES = (
    PersistentConfig(4, 2048, 2048, 4, 2),
    PersistentConfig(4, 2048, 2048, 4, 2, splits=4),
    PersistentConfig(4, 2048, 2048, 8, 2, splits=8),
    PersistentConfig(8, 2048, 2048, 8, 2, splits=8),
    PersistentConfig(4, 2048, 2048, 16, 1, splits=8),
    PersistentConfig(8, 2048, 2048, 16, 1, splits=8),
    PersistentConfig(2, 2048, 2048, 8, 2, splits=8),
    PersistentConfig(2, 2048, 2048, 4, 3, depth=2),
)
GO_LANES = 16  # copies of each stage's "go" flag, 128 bytes apart: the programs poll GO_LANES addresses, not one
# Under Triton's interpreter (CPU tests): small tiles, few splits (numpy runs every masked lane).
INTERPRETER_PERSISTENT = PersistentConfig(rows=8, block_k=128, block_k_ff=64, num_warps=4, programs_per_sm=1,
                                          splits=4, block_s=16)
SPIN_LIMIT = 1 << 21  # polls (~1 µs each) before a wait gives up and flags an error


if triton is not None:

    @triton.jit
    def _wait(GO, pid, go_value, ERR, SPIN_LIMIT: tl.constexpr, LANES: tl.constexpr):
        # spin until the stage behind GO is done (its last program stored go_value in every lane); once any
        # wait has given up, later ones do not spin (a failed launch ends in seconds, not SPIN_LIMIT polls each)
        lane = GO + (pid % LANES) * 32
        polls = tl.where(tl.load(ERR, volatile=True) != 0, SPIN_LIMIT, 0)
        while (tl.load(lane, volatile=True) != go_value) & (polls < SPIN_LIMIT):
            polls += 1
        if tl.load(lane, volatile=True) != go_value:
            tl.store(ERR, 1)
        tl.atomic_add(lane, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _arrive(COUNT, GO, nprog, go_value, LANES: tl.constexpr):
        # count this program in; the stage's last program (which acquires every other's release through the
        # counter) resets the counter and releases the go flag's lanes
        tl.debug_barrier()  # every thread's stores of this stage are issued before the counter says so
        arrived = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
        if arrived == nprog - 1:
            tl.atomic_xchg(COUNT, 0, sem="relaxed", scope="gpu")
            tl.debug_barrier()  # the other threads' release below is ordered after this thread's acquire
            lanes = tl.arange(0, LANES) * 32
            tl.atomic_xchg(GO + lanes, tl.full([LANES], 0, tl.int32) + go_value, sem="release", scope="gpu")

    @triton.jit
    def _stamp(TIMES, slot, TIMING: tl.constexpr):
        # profiling (TIMING): the GPU's nanosecond clock at this point of this program
        if TIMING:
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                          pack=1)
            tl.store(TIMES + slot, t)

    @triton.jit
    def _tile(W, chunk, kb, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
              SWIGLU: tl.constexpr):
        # weight rows [chunk·R, chunk·R + R), columns [kb·BK, kb·BK + BK) (and the up half's, with SWIGLU);
        # a chunk past the last is all masked (a program's tile after its last)
        rows = chunk * R + tl.arange(0, R)
        cols = kb * BK + tl.arange(0, BK)
        m = (rows < N)[:, None] & (cols < K)[None, :]
        at = W + rows[:, None].to(tl.int64) * K + cols[None, :]
        w = tl.load(at, mask=m, other=0.0)
        wu = w
        if SWIGLU:
            wu = tl.load(at + N * K, mask=m, other=0.0)
        return w, wu

    @triton.jit
    def _tile_at(W, pid, nprog, t, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                 SWIGLU: tl.constexpr):
        # the program's t-th tile: row chunk pid + (t // KB)·nprog, column tile t % KB
        KB: tl.constexpr = (K + BK - 1) // BK
        return _tile(W, pid + (t // KB) * nprog, t % KB, N, K, R, BK, SWIGLU)

    @triton.jit
    def _first_tiles(pid, nprog, W, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                     SWIGLU: tl.constexpr, DEPTH: tl.constexpr):
        # read before the stage's wait (weights never depend on the previous stage): tile 0, and tile 1 with
        # DEPTH 2 (else tile 0 again: the same values, no second read)
        w, wu = _tile_at(W, pid, nprog, 0, N, K, R, BK, SWIGLU)
        w1, wu1 = w, wu
        if DEPTH == 2:
            w1, wu1 = _tile_at(W, pid, nprog, 1, N, K, R, BK, SWIGLU)
        return w, wu, w1, wu1

    @triton.jit
    def _product(pid, nprog, X, W, OUT, RES, NORM_W, eps, tiles, N: tl.constexpr, K: tl.constexpr,
                 HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, R: tl.constexpr,
                 BK: tl.constexpr, DEPTH: tl.constexpr):
        # This program's share of OUT = [RMSNorm](X) @ W.T [SwiGLU] [+ RES]: row chunks pid, pid + nprog, ...,
        # each in KB column tiles; `tiles` holds its first DEPTH tiles, already loaded (_first_tiles). Same
        # math as decode._gemv_kernel.
        w, wu, w1, wu1 = tiles
        dt = OUT.dtype.element_ty
        KB: tl.constexpr = (K + BK - 1) // BK
        n_chunks: tl.constexpr = (N + R - 1) // R
        n_tiles = tl.maximum((n_chunks - pid + nprog - 1) // nprog, 0) * KB
        r = tl.arange(0, R)
        cols = tl.arange(0, BK)
        rstd = 1.0
        if HAS_NORM:
            ss = tl.zeros([BK], dtype=tl.float32)
            for j in tl.static_range(KB):
                xk = tl.load(X + j * BK + cols, mask=j * BK + cols < K, other=0.0,
                             cache_modifier=".cg").to(tl.float32)
                ss += xk * xk
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        x0 = tl.load(X + cols, mask=cols < K, other=0.0, cache_modifier=".cg").to(tl.float32)
        if HAS_NORM:
            x0 = x0 * tl.load(NORM_W + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc = tl.zeros([R], dtype=tl.float32)
        acc_up = tl.zeros([R], dtype=tl.float32)
        for t in range(0, n_tiles):
            w_next, wu_next = _tile_at(W, pid, nprog, t + DEPTH, N, K, R, BK, SWIGLU)
            kb = t % KB
            if KB == 1:
                xv = x0
            else:
                k_ok = kb * BK + cols < K
                xv = tl.load(X + kb * BK + cols, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                if HAS_NORM:
                    xv = xv * tl.load(NORM_W + kb * BK + cols, mask=k_ok, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
            if SWIGLU:
                acc_up += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
            if kb == KB - 1:
                rows = (pid + (t // KB) * nprog) * R + r
                row_ok = rows < N
                y = acc
                if HAS_NORM:
                    y = y * rstd
                y = y.to(dt).to(tl.float32)
                if SWIGLU:
                    up = acc_up
                    if HAS_NORM:
                        up = up * rstd
                    up = up.to(dt).to(tl.float32)
                    y = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32) * up
                if HAS_RES:
                    y = tl.load(RES + rows, mask=row_ok, other=0.0, cache_modifier=".cg").to(tl.float32) + y
                tl.store(OUT + rows, y.to(dt), mask=row_ok)
                acc = tl.zeros([R], dtype=tl.float32)
                acc_up = tl.zeros([R], dtype=tl.float32)
            if DEPTH == 2:
                w, wu = w1, wu1
                w1, wu1 = w_next, wu_next
            else:
                w, wu = w_next, wu_next

    @triton.jit
    def _product_stage(pid, nprog, X, W, OUT, RES, NORM_W, eps, WAIT_GO, wait, COUNT, GO, go_value, ERR, TIMES,
                       stamp, N: tl.constexpr, K: tl.constexpr, HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr,
                       HAS_RES: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, DEPTH: tl.constexpr,
                       SPIN_LIMIT: tl.constexpr, LANES: tl.constexpr, TIMING: tl.constexpr, ARRIVE: tl.constexpr):
        # One product stage: its first weight tiles read, then (if `wait`) the wait for the stage behind
        # WAIT_GO, this program's share of the product between two clock stamps, and (ARRIVE) its arrival
        tiles = _first_tiles(pid, nprog, W, N, K, R, BK, SWIGLU, DEPTH)
        if wait:
            _wait(WAIT_GO, pid, go_value, ERR, SPIN_LIMIT, LANES)
        _stamp(TIMES, stamp, TIMING)
        _product(pid, nprog, X, W, OUT, RES, NORM_W, eps, tiles, N, K, HAS_NORM, SWIGLU, HAS_RES, R, BK, DEPTH)
        _stamp(TIMES, stamp + 1, TIMING)
        if ARRIVE:
            _arrive(COUNT, GO, nprog, go_value, LANES)

    @triton.jit
    def _decode_step_kernel(X, QKV, ATTN, HIDDEN, LOGITS, WBASE, OFFSETS, NORM_F, HEAD_W, POS, COS, SIN, PART,
                            SYNC, GO, ERR, TIMES, n_layers, cache_len, eps, scale,
                            D: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
                            F: tl.constexpr, V: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                            BKF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                            DEPTH: tl.constexpr, DOT_FP32: tl.constexpr, SPIN_LIMIT: tl.constexpr,
                            LANES: tl.constexpr, TIMING: tl.constexpr):
        # OFFSETS (n_layers, 8) int64: element offsets from WBASE of a layer's q/k/v, o, gate/up and down
        # weights, its two norm weights and its key and value caches (all in the model dtype, 16-element
        # aligned). SYNC: STAGES_PER_LAYER arrival counters per layer, the exit counter, one arrival counter
        # per (row, kv head), all zero at launch and at exit; then the launch counter (the epoch). GO: per
        # stage, LANES flags 32 ints apart, each holding the epoch + 1 of the last launch that finished that
        # stage (so they are never reset: a stale value is the previous epoch's). TIMES (TIMING): per stage
        # and program, the clock after its wait and before its arrival.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        NQKV: tl.constexpr = (HQ + 2 * HKV) * HD
        EXIT = SYNC + 8 * n_layers
        HEAD_COUNT = EXIT + 1
        EPOCH = HEAD_COUNT + HKV
        go_value = tl.load(EPOCH, volatile=True) + 1
        STRIDE: tl.constexpr = 32 * LANES  # one stage's go lanes
        for layer in range(n_layers):
            at = OFFSETS + layer * 8
            w_qkv = WBASE + tl.multiple_of(tl.load(at + 0), 16)
            w_o = WBASE + tl.multiple_of(tl.load(at + 1), 16)
            w_gate_up = WBASE + tl.multiple_of(tl.load(at + 2), 16)
            w_down = WBASE + tl.multiple_of(tl.load(at + 3), 16)
            norm_1 = WBASE + tl.load(at + 4)
            norm_2 = WBASE + tl.load(at + 5)
            k_cache = WBASE + tl.multiple_of(tl.load(at + 6), 16)
            v_cache = WBASE + tl.multiple_of(tl.load(at + 7), 16)
            flags = SYNC + layer * 8
            go = GO + layer * 8 * STRIDE
            stamp = (layer * 5 * nprog + pid) * 2
            # 1. RMSNorm -> q/k/v (waits for the previous layer's down product)
            _product_stage(pid, nprog, X, w_qkv, QKV, X, norm_1, eps, go - 4 * STRIDE, layer > 0, flags + 0, go,
                           go_value, ERR, TIMES, stamp, NQKV, D, True, False, False, R, BK, DEPTH, SPIN_LIMIT,
                           LANES, TIMING, True)
            # 2. attention
            _wait(go + 0 * STRIDE, pid, go_value, ERR, SPIN_LIMIT, LANES)
            _stamp(TIMES, stamp + 2 * nprog, TIMING)
            _attention(pid, nprog, 1, QKV, k_cache, v_cache, ATTN, POS, COS, SIN, PART, HEAD_COUNT, cache_len,
                       scale, HQ, HKV, HD, BLOCK_G, BLOCK_S, SPLITS, DOT_FP32)
            _stamp(TIMES, stamp + 2 * nprog + 1, TIMING)
            _arrive(flags + 1, go + 1 * STRIDE, nprog, go_value, LANES)
            # 3. o + residual
            _product_stage(pid, nprog, ATTN, w_o, X, X, norm_1, eps, go + 1 * STRIDE, True, flags + 2,
                           go + 2 * STRIDE, go_value, ERR, TIMES, stamp + 4 * nprog, D, HQ * HD, False, False, True,
                           R, BK, DEPTH, SPIN_LIMIT, LANES, TIMING, True)
            # 4. RMSNorm -> gate/up -> SiLU(gate) * up
            _product_stage(pid, nprog, X, w_gate_up, HIDDEN, X, norm_2, eps, go + 2 * STRIDE, True, flags + 3,
                           go + 3 * STRIDE, go_value, ERR, TIMES, stamp + 6 * nprog, F, D, True, True, False, R, BK,
                           DEPTH, SPIN_LIMIT, LANES, TIMING, True)
            # 5. down + residual
            _product_stage(pid, nprog, HIDDEN, w_down, X, X, norm_1, eps, go + 3 * STRIDE, True, flags + 4,
                           go + 4 * STRIDE, go_value, ERR, TIMES, stamp + 8 * nprog, D, F, False, False, True, R,
                           BKF, DEPTH, SPIN_LIMIT, LANES, TIMING, True)
        # RMSNorm -> output head (no arrival: the exit counter below)
        _product_stage(pid, nprog, X, HEAD_W, LOGITS, X, NORM_F, eps, GO + ((n_layers - 1) * 8 + 4) * STRIDE, True,
                       SYNC, GO, go_value, ERR, TIMES, (n_layers * 5 * nprog + pid) * 2, V, D, True, False, False,
                       R, BK, DEPTH, SPIN_LIMIT, LANES, TIMING, False)
        # the last program out zeroes the head counters (each merger reset its own; this covers a failed
        # launch) and the exit counter, then advances the epoch for the next launch (a CUDA-graph replay)
        tl.debug_barrier()
        left = tl.atomic_add(EXIT, 1, sem="acq_rel", scope="gpu")
        if left == nprog - 1:
            idx = tl.arange(0, 128)
            n_sync = 8 * n_layers + 1 + HKV
            for i in range(0, n_sync, 128):
                tl.atomic_xchg(SYNC + i + idx, 0, mask=i + idx < n_sync)
            tl.atomic_add(EPOCH, 1, sem="release", scope="gpu")


def unsupported_reason(model, batch_size: int) -> Optional[str]:
    """Why the persistent step cannot run this fused model at this batch size, or None."""
    if triton is None:
        return "Triton is not installed"
    if batch_size != 1:
        return "the persistent decode step runs batch 1 only"
    c = model.config
    if c.n_heads % c.n_kv_heads:
        return "n_heads is not a multiple of n_kv_heads"
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        for p in (a.qkv_proj.weight, a.o_proj.weight, m.gate_up_proj.weight, m.down_proj.weight):
            if p.data_ptr() % 32:
                return "a weight is not 32-byte aligned"
    return None


class PersistentDecode:
    """The persistent kernel's fixed state for one fused model at batch 1: the offsets table (rebuilt by
    `bind` whenever the KV cache is re-allocated), the attention partials, the counters and the error flag."""

    def __init__(self, model, config: PersistentConfig) -> None:
        self.model = model
        self.config = config
        c = model.config
        device = model.embed_tokens.weight.device
        self.device = device
        self.base = model.embed_tokens.weight  # every weight and cache is addressed from this pointer
        self.offsets = torch.zeros(c.n_layers, 8, dtype=torch.int64, device=device)
        self.block_g = max(16, triton.next_power_of_2(c.n_heads // c.n_kv_heads))
        self.part = torch.empty(c.n_kv_heads * config.splits * self.block_g * (c.head_dim + 2), dtype=torch.float32,
                                device=device)
        self.sync = torch.zeros(8 * c.n_layers + 1 + c.n_kv_heads + 1, dtype=torch.int32, device=device)
        self.go = torch.zeros((8 * c.n_layers) * 32 * GO_LANES, dtype=torch.int32, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, device=device)
        self.times = torch.zeros(1, dtype=torch.int64, device=device)  # (stages, grid, 2) when profiling
        self.timing = False
        self.grid = 0  # programs: sized at the first run
        self.registers = None  # per thread, of the compiled kernel (CUDA)
        self.spilled = None  # registers spilled to local memory
        self._bound = None

    def bind(self) -> None:
        """Point the offsets table at the current KV caches (and weights)."""
        m = self.model
        cache = m.layers[0].self_attn.kv_cache
        if self._bound is not None and self._bound() is cache:
            return

        size = self.base.element_size()
        base = self.base.data_ptr()
        rows = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            ts = (a.qkv_proj.weight, a.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight,
                  layer.input_layernorm.weight, layer.post_attention_layernorm.weight, a.kv_cache.k, a.kv_cache.v)
            row = []
            for i, t in enumerate(ts):
                if t.dtype != self.base.dtype or not t.is_contiguous():
                    raise ValueError(f"persistent decode: {t.dtype} or non-contiguous tensor in layer weights")
                delta = t.data_ptr() - base
                assert delta % size == 0
                off = delta // size
                if i not in (4, 5) and off % 16:
                    raise ValueError("persistent decode: a weight or cache is not 16-element aligned")
                row.append(off)
            rows.append(row)
        self.offsets.copy_(torch.tensor(rows, dtype=torch.int64))
        self._bound = weakref.ref(cache)

    def _arguments(self, step) -> tuple[tuple, dict]:
        m, c, cfg = self.model, self.model.config, self.config
        cache = m.layers[0].self_attn.kv_cache
        args = (step.x, step.qkv, step.attn, step.hidden, step.logits, self.base, self.offsets, m.norm.weight,
                m.lm_head.weight, step.pos, m.rope_cos, m.rope_sin, self.part, self.sync, self.go, self.error,
                self.times, c.n_layers, cache.k.size(2), m.norm.eps, c.head_dim**-0.5)
        kwargs = dict(D=c.hidden_size, HQ=c.n_heads, HKV=c.n_kv_heads, HD=c.head_dim, F=c.intermediate_size,
                      V=c.vocab_size, R=cfg.rows, BK=cfg.block_k, BKF=cfg.block_k_ff, BLOCK_G=self.block_g,
                      BLOCK_S=cfg.block_s, SPLITS=cfg.splits, DEPTH=cfg.depth,
                      DOT_FP32=step.dtype == torch.float32 or _interpreted(), SPIN_LIMIT=SPIN_LIMIT, LANES=GO_LANES,
                      TIMING=self.timing, num_warps=cfg.num_warps, num_stages=1)
        return args, kwargs

    def _resident_grid(self, kernel) -> int:
        """Programs that fit on the GPU at once: the SM count times the fewest of the wanted programs per SM
        and what the compiled kernel's registers, shared memory and threads allow."""
        cfg = self.config
        props = torch.cuda.get_device_properties(self.device)
        threads = 32 * cfg.num_warps
        regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = props.regs_per_multiprocessor // (regs_per_warp * cfg.num_warps)
        shared = kernel.metadata.shared
        by_shared = props.shared_memory_per_multiprocessor // (shared + 1024) if shared else 32
        by_threads = props.max_threads_per_multi_processor // threads
        per_sm = max(0, min(cfg.programs_per_sm, by_regs, by_shared, by_threads, 32))
        if per_sm == 0:
            raise RuntimeError(f"persistent decode: {kernel.n_regs} registers x {threads} threads do not fit on an SM")
        return props.multi_processor_count * per_sm

    def run(self, step) -> None:
        """One decode step: step.x (the embedded tokens) -> step.logits, through every layer."""
        self.bind()
        args, kwargs = self._arguments(step)
        if self.grid == 0:  # first run: compile without launching, and size the grid from the kernel's resources
            if self.device.type == "cuda" and not _interpreted():
                kernel = _decode_step_kernel.warmup(*args, grid=(1,), **kwargs)
                kernel._init_handles()
                self.grid = self._resident_grid(kernel)
                self.registers = kernel.n_regs
                self.spilled = kernel.n_spills
            else:
                self.grid = 1
        _decode_step_kernel[(self.grid,)](*args, **kwargs)

    def profile(self, run_step) -> dict:
        """Run the step (`run_step()`: a TritonDecodeStep's `_layers` with this as its persistent kernel) with
        clock stamps (CUDA) and say where its time goes, per stage kind, summed over the layers, in µs: `work`
        from the first program's start of a stage (its wait met) to the last one's end, `sync` from that end
        to the next stage's first start (the barrier), and the step's span."""
        c = self.model.config
        n_stages = 5 * c.n_layers + 1
        most = torch.cuda.get_device_properties(self.device).multi_processor_count * 32  # programs, at most
        self.timing = True
        try:
            self.times = torch.zeros(n_stages * most * 2, dtype=torch.int64, device=self.device)
            run_step()  # compiles the timing kernel (and sizes the grid) on its first call
            run_step()
            torch.cuda.synchronize(self.device)
            t = self.times[: n_stages * self.grid * 2].view(n_stages, self.grid, 2).double()
        finally:
            self.timing = False
            self.times = torch.zeros(1, dtype=torch.int64, device=self.device)
        first_start, last_end = t[:, :, 0].min(1).values, t[:, :, 1].max(1).values
        names = ["qkv", "attention", "o", "gate_up", "down"] * c.n_layers + ["head"]
        report: dict = {}
        for i, name in enumerate(names):
            r = report.setdefault(name, {"work_us": 0.0, "sync_us": 0.0})
            r["work_us"] += float(last_end[i] - first_start[i]) / 1e3
            if i + 1 < n_stages:
                r["sync_us"] += float(first_start[i + 1] - last_end[i]) / 1e3
        report = {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in report.items()}
        report["span_us"] = round(float(last_end[-1] - first_start[0]) / 1e3, 1)
        report["programs"] = self.grid
        return report

    def failed(self) -> bool:
        """Whether a wait gave up (reads the flag: synchronises with the GPU)."""
        return bool(self.error.item())
