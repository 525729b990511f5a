"""How fast can one product of a batched decode step read its weights? (issue 15, batch-32 decode goal)

python perf/rows_product_sweep.py [--rows 1,32] [--out rows_product_sweep.json]

The 32-row Triton decode step reads its weights at 1.05-2.05 TB/s in q/k/v, o, gate/up and down on the H200
(BENCHMARKS.md, sixth session), against ~4.3 TB/s for a device copy, and split-K did not move o, gate/up or
down. Before changing the step, this measures what the same plain products (y = x @ W.T, x of `rows` rows,
bf16, no norm or residual) reach with (at 1 row too: the batch-1 step reads gate/up at 3.2 TB/s, down at 2.65):
  cublas     torch.mm (what the compiled torch step runs);
  ours       the step's kernel (`kernels.decode.gemv`): at 1 row the GEMV kernel, every GEMV_CANDIDATES
             tile; else the rows kernel, every ROWS_CANDIDATES tile;
  ours_step  the same with the step's prologue / epilogue for that product (RMSNorm, SwiGLU, residual);
  plain      a minimal Triton GEMM (pointer loads, the weight tile as the left operand, num_stages
             pipelined), tiles x stages x split-K (split-K: fp32 atomics into a zeroed buffer);
  tma        the same with the weight tiles loaded through TMA tensor descriptors;
  tma_gemv   at 1 row: TMA-loaded weight tiles times x on the CUDA cores (plain and tma are left out there).
Each variant runs over 22 different matrices of each shape in turn (as the step does; one matrix would sit in
L2), as CUDA-graph replays; the table gives µs per matrix and the weights' TB/s, best tile per variant.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl

from tinyllama.kernels.decode import GEMV_CANDIDATES, ROWS_CANDIDATES, gemv, time_candidates

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

LAYERS = 22
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}


@triton.jit
def _plain_kernel(X, W, OUT, M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    k_start = tl.program_id(1) * K_SPLIT
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + K_SPLIT, BLOCK_K, num_stages=STAGES):
        w = tl.load(W + rows[:, None] * K + k0 + cols[None, :], mask=(rows < N)[:, None], other=0.0)
        x = tl.load(X + ms[:, None] * K + k0 + cols[None, :], mask=(ms < M)[:, None], other=0.0)
        acc += tl.dot(w, tl.trans(x))
    at = ms[None, :] * N + rows[:, None]
    ok = (rows < N)[:, None] & (ms < M)[None, :]
    if ATOMIC:
        tl.atomic_add(OUT + at, acc, mask=ok, sem="relaxed")
    else:
        tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _tma_kernel(X, w_desc, OUT, M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    k_start = tl.program_id(1) * K_SPLIT
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + K_SPLIT, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([pid_n * BLOCK_N, k0])
        x = tl.load(X + ms[:, None] * K + k0 + cols[None, :], mask=(ms < M)[:, None], other=0.0)
        acc += tl.dot(w, tl.trans(x))
    at = ms[None, :] * N + rows[:, None]
    ok = (rows < N)[:, None] & (ms < M)[None, :]
    if ATOMIC:
        tl.atomic_add(OUT + at, acc, mask=ok, sem="relaxed")
    else:
        tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _tma_gemv_kernel(X, w_desc, OUT, N, K, K_SPLIT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     ATOMIC: tl.constexpr, STAGES: tl.constexpr):
    # one row on the CUDA cores: TMA-loaded (BLOCK_N, BLOCK_K) weight tiles times x, summed per row at once
    pid_n = tl.program_id(0)
    k_start = tl.program_id(1) * K_SPLIT
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + K_SPLIT, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([pid_n * BLOCK_N, k0])
        x = tl.load(X + k0 + cols).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if ATOMIC:
        tl.atomic_add(OUT + rows, acc, mask=rows < N, sem="relaxed")
    else:
        tl.store(OUT + rows, acc.to(OUT.dtype.element_ty), mask=rows < N)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rows_product_sweep.json"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(dev), "layers": LAYERS, "products": {}}
    print(f"{report['device']}, {LAYERS} matrices per shape, CUDA-graph replays; µs per matrix (TB/s)")
    for M, name in itertools.product([int(r) for r in a.rows.split(",")], a.shapes.split(",")):
        block_m = max(16, triton.next_power_of_2(M))
        N, K = SHAPES[name]
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        out32 = torch.zeros(M, N, device=dev, dtype=torch.float32)
        ref = (x.float() @ ws[-1].float().t())
        bytes_per = N * K * 2
        rows: dict[str, dict] = {}

        def record(variant, times, check):
            if not times:
                rows[variant] = {"error": "no candidate ran"}
                return
            cfg = min(times, key=times.get)
            us = times[cfg] / LAYERS
            if check is not None:
                check(cfg)
            err = None if check is None else ((result_of() - ref).abs().max() / ref.abs().max()).item()
            rows[variant] = {"us": us, "tb_s": bytes_per / us / 1e6, "config": str(cfg), "rel_err": err,
                             "candidates": {str(c): t / LAYERS for c, t in sorted(times.items(), key=lambda kv: kv[1])[:6]}}

        result = {}

        def result_of():
            return result["y"].float()

        def run_cublas(_):
            for w in ws:
                torch.mm(x, w.t(), out=out)
        times = time_candidates(run_cublas, ["cublas"])

        def check_cublas(cfg):
            run_cublas(cfg)
            result["y"] = out
        record("cublas", times, check_cublas)

        def run_ours(cfg):
            for w in ws:
                gemv(x, w, out, config=cfg)
        times = time_candidates(run_ours, GEMV_CANDIDATES if M == 1 else ROWS_CANDIDATES)

        def check_ours(cfg):
            run_ours(cfg)
            result["y"] = out
        record("ours", times, check_ours)

        # the same kernel with the step's prologue / epilogue for this product (q/k/v: RMSNorm; gate/up:
        # RMSNorm and SwiGLU; o, down: residual add in place): what the norm prologue, which every program
        # runs again on its slice of x, costs (no reference check: the product is not x @ W.T then)
        flags = {"qkv": dict(norm_weight=torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5),
                 "gate_up": dict(norm_weight=torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5, swiglu=True),
                 "o": dict(residual=out), "down": dict(residual=out)}[name]
        step_out = torch.empty(M, N // 2, device=dev, dtype=torch.bfloat16) if flags.get("swiglu") else out

        def run_ours_step(cfg):
            for w in ws:
                gemv(x, w, step_out, config=cfg, **flags)
        record("ours_step", time_candidates(run_ours_step, GEMV_CANDIDATES if M == 1 else ROWS_CANDIDATES),
               None)

        def plain_launch(kernel, operand, cfg):
            bn, bk, warps, stages, split = cfg
            k_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
            atomic = split > 1
            dst = out32 if atomic else out
            if atomic:
                dst.zero_()
            kernel[(triton.cdiv(N, bn), triton.cdiv(K, k_split))](
                x, operand, dst, M, N, K, k_split, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, ATOMIC=atomic,
                STAGES=stages, num_warps=warps)

        grid = [c for c in itertools.product((64, 128), (128, 256), (4,), (3, 4), (1, 2, 4))
                if c[0] * c[1] * 2 * c[3] <= 160 * 1024] if M > 1 else []  # 1 row: tma_gemv below

        def run_plain(cfg):
            for w in ws:
                plain_launch(_plain_kernel, w, cfg)
        def check_plain(cfg):
            run_plain(cfg)
            result["y"] = out32 if cfg[4] > 1 else out
        if grid:
            record("plain", time_candidates(run_plain, grid), check_plain)

        if TensorDescriptor is not None:
            descs = {}

            def run_tma(cfg):
                bn, bk = cfg[0], cfg[1]
                for i, w in enumerate(ws):
                    d = descs.get((i, bn, bk))
                    if d is None:
                        d = descs[(i, bn, bk)] = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
                    plain_launch(_tma_kernel, d, cfg)
            def check_tma(cfg):
                run_tma(cfg)
                result["y"] = out32 if cfg[4] > 1 else out
            if grid:
                record("tma", time_candidates(run_tma, grid), check_tma)
            if M == 1:  # the same loads on the CUDA cores (no padding of the one row to 16)
                def run_tma_gemv(cfg):
                    bn, bk, warps, stages, split = cfg
                    k_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
                    dst = out32 if split > 1 else out
                    if split > 1:
                        dst.zero_()
                    for i, w in enumerate(ws):
                        d = descs.get((i, bn, bk))
                        if d is None:
                            d = descs[(i, bn, bk)] = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
                        _tma_gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(K, k_split))](
                            x, d, dst, N, K, k_split, BLOCK_N=bn, BLOCK_K=bk, ATOMIC=split > 1, STAGES=stages,
                            num_warps=warps)
                gemv_grid = [c for c in itertools.product((8, 16, 32, 64), (128, 256), (4,), (3, 6), (1, 2))
                             if c[0] * c[1] * 2 * c[3] <= 160 * 1024]
                times = time_candidates(run_tma_gemv, gemv_grid)

                def check_tma_gemv(cfg):
                    run_tma_gemv(cfg)
                    result["y"] = out32 if cfg[4] > 1 else out
                record("tma_gemv", times, check_tma_gemv)
        report["products"][f"{name} x{M}"] = rows
        line = "  ".join(f"{v} {r['us']:.1f} ({r['tb_s']:.2f}) {r['config']}" if "us" in r else f"{v} -"
                         for v, r in rows.items())
        print(f"{M:2d} rows {name:8s} {N}x{K}: {line}", flush=True)
        del ws
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
