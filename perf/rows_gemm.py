"""The decode step's products for a batch of rows: each Triton rows-kernel candidate against cuBLAS (F.linear).

python perf/rows_gemm.py [--batches 1,4,8,16,32] [--products qkv,o,gate_up,down,head] [--sweep 60 --budget-s 45]
    [--out rows_gemm.json]
Every product shape of one TinyLlama-1.1B decode step, with its fused epilogue (RMSNorm scale, SiLU * up,
residual add), over 22 distinct weight matrices per shape in turn (as the step reads them: the 50 MB L2
holds one layer's q/k/v and o), each timed as a CUDA-graph replay (`kernels.decode.time_candidates`).
Batch 1 times the GEMV kernel's candidates. cuBLAS runs the bare product (no epilogue) on the same
weights, so it is a lower bound for the torch step's product. Prints us per product and weight GB/s.
--sweep N adds up to N tiles drawn (seeded) from a wider grid (rows per tile, columns per step, warps, stages,
swapped operands, split-K) that fit shared memory, timed after the tuner's own candidates until --budget-s
seconds per product have passed (each new tile is a Triton compile): what the tuner's list leaves out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from tinyllama.kernels import decode


def sweep_tiles(n: int, rows: int, swiglu: bool, known) -> list:
    """Up to n rows-kernel tiles from the wider grid, in a seeded random order, that fit 220 KB of shared memory
    (stages x (weight tile(s) + the inputs' tile) in bf16) and are not among `known`."""
    block_m = max(16, 1 << (rows - 1).bit_length())
    grid = []
    for bn, bk, warps, stages, swap, split in itertools.product((16, 32, 64, 128), (64, 128, 256, 512), (4, 8),
                                                                (1, 2, 3, 4), (False, True), (1, 2, 4, 8)):
        smem = stages * ((2 if swiglu else 1) * bn + block_m) * bk * 2
        cfg = decode.GemvConfig(bn, bk, warps, stages, swap=swap, split_k=split)
        if smem <= 220 * 1024 and cfg not in known:
            grid.append(cfg)
    random.Random(0).shuffle(grid)
    return grid[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--products", default="qkv,o,gate_up,down,head", help="which products, by the names' first word")
    ap.add_argument("--sweep", type=int, default=0, help="extra tiles from a wider grid (batches > 1)")
    ap.add_argument("--budget-s", type=float, default=45.0, help="seconds per product for the extra tiles")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rows_gemm.json"))
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    H, F_, V, L = 2048, 5632, 32000, 22
    shapes = {  # name: (weight rows, K, kwargs, copies)
        "qkv (norm)": (2560, H, dict(norm=True), L),
        "o (+res)": (H, H, dict(res=True), L),
        "gate_up (norm, swiglu)": (2 * F_, H, dict(norm=True, swiglu=True), L),
        "down (+res)": (H, F_, dict(res=True), L),
        "lm_head (norm)": (V, H, dict(norm=True), 1),
    }
    wanted = {w.strip() for w in a.products.split(",")}
    shapes = {k: v for k, v in shapes.items() if k.split()[0].replace("lm_", "") in wanted}
    pdl = decode.pdl_supported(dev)
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "pdl": pdl, "rows": []}
    for B in [int(b) for b in a.batches.split(",")]:
        for name, (n_rows, K, kw, copies) in shapes.items():
            weights = [torch.randn(n_rows, K, device=dev, dtype=dt) / K**0.5 for _ in range(copies)]
            N = n_rows // 2 if kw.get("swiglu") else n_rows
            x = torch.randn((B, K) if B > 1 else (K,), device=dev, dtype=dt)
            out = torch.zeros((B, N) if B > 1 else (N,), device=dev, dtype=dt)
            gkw = dict(swiglu=kw.get("swiglu", False))
            if kw.get("norm"):
                gkw["norm_weight"] = torch.ones(K, device=dev, dtype=dt)
            if kw.get("res"):
                gkw["residual"] = out

            ws = decode.SplitKWorkspace(dev)  # one for all calls, as the step keeps one (no allocation in the graph)

            def ours(cfg):
                for w in weights:
                    decode.gemv(x, w, out, config=cfg, pdl=pdl, workspace=ws, **gkw)

            cands = decode.GEMV_CANDIDATES if B == 1 else decode.ROWS_CANDIDATES
            t0 = time.perf_counter()
            times = decode.time_candidates(ours, cands)
            tuner_best = min(times, key=times.get) if times else None
            if a.sweep and B > 1:
                for cfg in sweep_tiles(a.sweep, B, kw.get("swiglu", False), set(cands)):
                    if time.perf_counter() - t0 > a.budget_s:
                        break
                    times.update(decode.time_candidates(ours, [cfg]))
            y = torch.empty((B, n_rows), device=dev, dtype=dt)
            x2 = x.view(B, K)
            cublas = decode.time_candidates(lambda _: [torch.matmul(x2, w.t(), out=y) for w in weights], [None])
            gb = copies * n_rows * K * 2 / 1e9
            best = min(times, key=times.get)
            row = {"batch": B, "product": name, "weights_GB": round(gb, 3),
                   "cublas_us": round(cublas[None] / copies, 2), "cublas_GBps": round(gb / cublas[None] * 1e6, 0),
                   "triton_best_us": round(times[best] / copies, 2), "triton_best_GBps": round(gb / times[best] * 1e6, 0),
                   "triton_best": str(best), "tuner_list_best_us": round(times[tuner_best] / copies, 2),
                   "tiles_timed": len(times),
                   "candidates_us": {str(c): round(t / copies, 2) for c, t in sorted(times.items(), key=lambda kv: kv[1])}}
            report["rows"].append(row)
            print(f"B {B:>2} {name:<24} cuBLAS {row['cublas_us']:>8.2f} us {row['cublas_GBps']:>6.0f} GB/s | Triton best "
                  f"{row['triton_best_us']:>8.2f} us {row['triton_best_GBps']:>6.0f} GB/s  {best} | the tuner's list "
                  f"{row['tuner_list_best_us']:.2f} us; {len(times)} tiles timed", flush=True)
            del weights
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
