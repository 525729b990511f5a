"""Time every GEMM of one TinyLlama-1.1B training step (8 × 2048 tokens) in the layouts the fused block uses,
and alternatives, on the GPU: which products sit under the measured bf16 ceiling.

PYTHONUNBUFFERED=1 python perf/gemm_shapes.py [--blas cublas,cublaslt]

--blas: time the step's layouts under each of torch's BLAS back ends in turn (torch.backends.cuda.
preferred_blas_library), in one process: does cuBLASLt's heuristic pick faster kernels for these shapes?
"""

import argparse

import torch
import triton.testing as tt

N = 16384
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632), "head/4": (32000, 2048)}
bf = torch.bfloat16


def ms(fn):
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")


STEP_LAYOUTS = ("fwd x@w.t", "dgrad dy@w", "wgrad dy.t@x f32")  # the fused block's, of those in `products`


def per_step_count(name: str) -> int:
    """How often a step runs this shape's products: once a layer, or once a cross-entropy chunk (the head)."""
    return 4 if name == "head/4" else 22


def products(name: str):
    """(flop, {layout: product}) for one shape: random operands on the GPU, each layout this script times."""
    M, K = SHAPES[name]
    rows = N // 4 if name == "head/4" else N
    x = torch.randn(rows, K, device="cuda", dtype=bf)
    w = torch.randn(M, K, device="cuda", dtype=bf) * 0.02
    dy = torch.randn(rows, M, device="cuda", dtype=bf)
    return 2 * rows * M * K, {
        "fwd x@w.t": lambda: torch.mm(x, w.t()),
        "fwd (w@x.t).t": lambda: torch.mm(w, x.t()),
        "dgrad dy@w": lambda: torch.mm(dy, w),
        "dgrad (w.t@dy.t).t": lambda: torch.mm(w.t(), dy.t()),
        "wgrad dy.t@x f32": lambda: torch.mm(dy.t(), x, out_dtype=torch.float32),
        "wgrad dy.t@x bf16": lambda: torch.mm(dy.t(), x),
        "wgrad (x.t@dy).t f32": lambda: torch.mm(x.t(), dy, out_dtype=torch.float32),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blas", default="", help="comma-separated back ends, e.g. cublas,cublaslt")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    if args.blas:
        compare_blas(args.blas.split(","))
        return
    big = torch.randn(8192, 8192, device="cuda", dtype=bf)
    t = ms(lambda: big @ big)
    print(f"ceiling 8192^3: {t:.3f} ms {2 * 8192**3 / t / 1e9:.0f} TFLOP/s")
    total = {}
    per_step = 0.0
    print(f"{'gemm':<28} {'ms':>7} {'TFLOP/s':>8}")
    for name in SHAPES:
        flop, cases = products(name)
        for c, fn in cases.items():
            t = ms(fn)
            print(f"{name + ' ' + c:<28} {t:7.3f} {flop / t / 1e9:8.0f}", flush=True)
            total[(name, c)] = t
    print("per step (22 layers + 4 head chunks), the layouts the fused block uses:")
    for name in SHAPES:
        s = per_step_count(name) * sum(total[(name, c)] for c in STEP_LAYOUTS)
        per_step += s
        print(f"  {name:<8} {s:7.2f} ms")
    print(f"  total    {per_step:7.2f} ms")


def compare_blas(backends):
    """The step's three layouts per shape under each back end, alternating twice (clocks drift on a
    power-capped card), and the per-step totals."""
    times = {b: {} for b in backends}
    for name in SHAPES:
        flop, cases = products(name)
        for c in STEP_LAYOUTS:
            fn = cases[c]
            for _ in range(2):
                for b in backends:
                    torch.backends.cuda.preferred_blas_library(b)
                    times[b].setdefault((name, c), []).append(ms(fn))
            row = "  ".join(f"{b} {min(times[b][(name, c)]):.3f} ms {flop / min(times[b][(name, c)]) / 1e9:4.0f}"
                            for b in backends)
            print(f"{name + ' ' + c:<24} {row}", flush=True)
    for b in backends:
        per_step = sum(per_step_count(name) * min(times[b][(name, c)])
                       for name in SHAPES for c in STEP_LAYOUTS)
        print(f"per step, {b}: {per_step:.2f} ms")


if __name__ == "__main__":
    main()
