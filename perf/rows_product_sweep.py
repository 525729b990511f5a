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
  plain      a minimal Triton GEMM (`_product_kernel`: pointer loads, the weight tile as the left operand,
             num_stages pipelined), tiles x stages x split-K (split-K: fp32 atomics into a zeroed buffer);
  tma        the same kernel with the weight tiles loaded through TMA tensor descriptors;
  tma_gemv   at 1 row: the same kernel's TMA loads times x on the CUDA cores (plain and tma left out there).
Each variant runs over 22 different matrices of each shape in turn (as the step does; one matrix would sit in
L2), as CUDA-graph replays; the table gives µs per matrix and the weights' TB/s, best tile per variant.
Each (rows, shape) runs in its own process and prints each variant as it ends: on the H200 (2026-12-06) a
`plain` candidate hit an illegal memory access, which kills the CUDA context, and took the whole table with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

from tinyllama.kernels.decode import GEMV_CANDIDATES, ROWS_CANDIDATES, candidates_for, gemv, time_candidates

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

LAYERS = 22
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}


@triton.jit
def _product_kernel(X, W, OUT, M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr,
                    TENSOR_CORES: tl.constexpr):
    # y = x @ W.T over the columns [k_start, k_start + K_SPLIT) of BLOCK_N weight rows. TMA: W is a tensor
    # descriptor (TMA loads), else a pointer. TENSOR_CORES: the weight tile is the left operand of tl.dot and
    # the M rows, padded to BLOCK_M >= 16, the right one; else (one row) products on the CUDA cores, summed
    # per weight row. ATOMIC (split-K): fp32 sums added into a zeroed OUT.
    pid_n = tl.program_id(0)
    k_start = tl.program_id(1) * K_SPLIT
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    if TENSOR_CORES:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + K_SPLIT, BLOCK_K, num_stages=STAGES):
        if TMA:
            w = W.load([pid_n * BLOCK_N, k0])
        else:
            w = tl.load(W + rows[:, None] * K + k0 + cols[None, :], mask=(rows < N)[:, None], other=0.0)
        if TENSOR_CORES:
            x = tl.load(X + ms[:, None] * K + k0 + cols[None, :], mask=(ms < M)[:, None], other=0.0)
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.sum(w.to(tl.float32) * tl.load(X + k0 + cols).to(tl.float32)[None, :], axis=1)
    if TENSOR_CORES:
        at = ms[None, :] * N + rows[:, None]
        ok = (rows < N)[:, None] & (ms < M)[None, :]
    else:
        at = rows
        ok = rows < N
    if ATOMIC:
        tl.atomic_add(OUT + at, acc, mask=ok, sem="relaxed")
    else:
        tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=ok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rows_product_sweep.json"))
    ap.add_argument("--one", action="store_true", help="(internal) run the one --rows x --shapes given here")
    a = ap.parse_args()
    if not a.one:  # one process per (rows, shape): a crash loses that product's remaining variants only
        report = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "products": {}}
        print(f"{report['device']}, {LAYERS} matrices per shape, CUDA-graph replays; µs per matrix (TB/s)")
        for M, name in itertools.product(a.rows.split(","), a.shapes.split(",")):
            part = f"{a.out}.{name}x{M}.json"
            done = subprocess.run([sys.executable, __file__, "--one", "--rows", M, "--shapes", name, "--out", part],
                                  stderr=subprocess.PIPE, text=True)
            if os.path.exists(part):
                with open(part) as f:
                    report["products"].update(json.load(f)["products"])
                os.remove(part)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                report["products"].setdefault(f"{name} x{M}", {})["crash"] = last
                print(f"{int(M):2d} rows {name:8s} crashed: {last}", flush=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        return
    dev = torch.device("cuda")
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(dev), "layers": LAYERS, "products": {}}
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

        def record(variant, run, candidates, output=None):
            # time run(cfg) for each candidate; output(cfg): the tensor the fastest one wrote for the last
            # matrix, compared with the fp32 product (None: not a plain product, not compared), or (tensor,
            # reference) where it holds something else
            times = time_candidates(run, candidates)
            failed = len(candidates) - len(times)
            if not times:
                rows[variant] = {"error": "no candidate ran"}
                print(f"{M:2d} rows {name:8s} {variant}: no candidate ran", flush=True)
                return
            cfg = min(times, key=times.get)
            us = times[cfg] / LAYERS
            err = None
            if output is not None:
                run(cfg)
                got = output(cfg)
                got, want = got if isinstance(got, tuple) else (got, ref)
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
            rows[variant] = {"us": us, "tb_s": bytes_per / us / 1e6, "config": str(cfg), "rel_err": err,
                             "failed": failed,
                             "candidates": {str(c): t / LAYERS for c, t in sorted(times.items(), key=lambda kv: kv[1])[:6]}}
            print(f"{M:2d} rows {name:8s} {N}x{K} {variant:9s} {us:7.2f} µs ({rows[variant]['tb_s']:.2f} TB/s) {cfg}"
                  f"  err {err if err is None else f'{err:.1e}'}, {failed} of {len(candidates)} failed", flush=True)
            report["products"][f"{name} x{M}"] = rows
            with open(a.out, "w") as f:  # what has run so far survives a crash in the next variant
                json.dump(report, f, indent=1)

        def written(_):
            return out

        def run_cublas(_):
            for w in ws:
                torch.mm(x, w.t(), out=out)
        record("cublas", run_cublas, ["cublas"], written)

        step_candidates = GEMV_CANDIDATES if M == 1 else ROWS_CANDIDATES

        def run_ours(cfg):
            for w in ws:
                gemv(x, w, out, config=cfg)
        record("ours", run_ours, candidates_for(step_candidates, has_norm=False), written)

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
        record("ours_step", run_ours_step, candidates_for(step_candidates, "norm_weight" in flags))

        descs = {}  # (matrix, tile) -> its TMA descriptor, made once (outside the captured graphs' replays)

        def launcher(tma, tensor_cores):
            def run(cfg):
                bn, bk, warps, stages, split = cfg
                k_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
                dst = out32 if split > 1 else out
                if split > 1:
                    dst.zero_()
                for i, w in enumerate(ws):
                    if tma:
                        if (i, bn, bk) not in descs:
                            descs[(i, bn, bk)] = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
                        w = descs[(i, bn, bk)]
                    _product_kernel[(triton.cdiv(N, bn), triton.cdiv(K, k_split))](
                        x, w, dst, M, N, K, k_split, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, ATOMIC=split > 1,
                        STAGES=stages, TMA=tma, TENSOR_CORES=tensor_cores, num_warps=warps)
            return run

        ref_all = sum(x.float() @ w.float().t() for w in ws)

        def split_output(cfg):  # split-K adds every matrix's product into out32, zeroed once per run
            return (out32, ref_all) if cfg[4] > 1 else out

        if M > 1:  # TMA first: the plain variant is the one that crashed on the H200 (2026-12-06)
            grid = [c for c in itertools.product((64, 128), (128, 256), (4,), (3, 4), (1, 2, 4))
                    if c[0] * c[1] * 2 * c[3] <= 160 * 1024]
            if TensorDescriptor is not None:
                record("tma", launcher(True, True), grid, split_output)
            record("plain", launcher(False, True), grid, split_output)
        elif TensorDescriptor is not None:  # one row: the TMA loads on the CUDA cores (no padding to 16 rows)
            gemv_grid = [c for c in itertools.product((8, 16, 32, 64), (128, 256), (4,), (3, 6), (1, 2))
                         if c[0] * c[1] * 2 * c[3] <= 160 * 1024]
            record("tma_gemv", launcher(True, False), gemv_grid, split_output)
        del ws
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
