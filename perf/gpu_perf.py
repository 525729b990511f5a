"""One GPU call: check every fused op against its reference on fresh random inputs, then time variants.

PYTHONUNBUFFERED=1 python perf/gpu_perf.py --check --sdpa --profile --bench ours,reference,hf-eager,hf-compile
Writes a JSON of everything to $OUT/perf.json (when OUT is set). See perf/NOTES.md for results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from tinyllama.bench import train as bt
from tinyllama.config import ModelConfig
from tinyllama.kernels import KernelConfig, apply_fast_path, causal_attention, linear_cross_entropy

DEV = torch.device("cuda")
ATTENTION_TIMED = ("auto", "flash", "cudnn", "efficient", "fa4")  # fa4 where flash-attn-4 is importable
RESULTS: dict = {}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_ms(fn, reps=20):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def check_ce():
    out = {}
    for n in (4096, 4093):  # a full and a ragged last chunk
        torch.manual_seed(n)
        x = torch.randn(n, 2048, device=DEV)
        w = (torch.randn(32000, 2048, device=DEV) * 0.02)
        t = torch.randint(0, 32000, (n,), device=DEV)
        t[torch.rand(n, device=DEV) < 0.1] = -100
        grads = {}
        for name in ("fused", "ref", "f64"):
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            if name == "f64":
                xx, ww = x.double().requires_grad_(), w.double().requires_grad_()
                loss = torch.nn.functional.cross_entropy(xx @ ww.t(), t, ignore_index=-100)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    if name == "fused":
                        loss = linear_cross_entropy(xx, ww, t, chunk_rows=1024)
                    else:
                        logits = xx @ ww.t()
                        loss = torch.nn.functional.cross_entropy(logits.float(), t, ignore_index=-100)
            loss.backward()
            grads[name] = (loss.detach(), xx.grad, ww.grad)
        for name in ("fused", "ref"):
            out[f"n={n} {name} vs f64"] = {
                "loss": rel(grads[name][0], grads["f64"][0]),
                "grad_x": rel(grads[name][1], grads["f64"][1]),
                "grad_w": rel(grads[name][2], grads["f64"][2]),
            }
    # memory: the fused loss on a full micro-batch of 16 k rows vs the unfused one
    for name in ("fused", "ref"):
        torch.cuda.empty_cache()
        x = torch.randn(16384, 2048, device=DEV, requires_grad=True)
        w = (torch.randn(32000, 2048, device=DEV) * 0.02).requires_grad_()
        t = torch.randint(0, 32000, (16384,), device=DEV)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if name == "fused":
                    loss = linear_cross_entropy(x, w, t)
                else:
                    loss = torch.nn.functional.cross_entropy((x @ w.t()).float(), t)
            loss.backward()
            x.grad = w.grad = None

        f()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        ms = bench_ms(f)
        out[f"16k rows {name}"] = {"extra_peak_GB": round(peak, 2), "fwd+bwd ms": round(ms, 2)}
        del x, w, t
    return out


def check_attention():
    out = {}
    torch.manual_seed(1)
    q = torch.randn(2, 32, 1024, 64, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 1024, 64, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(2, 4, 1024, 64, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn_like(q)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    kk, vv = kr.repeat_interleave(8, 1), vr.repeat_interleave(8, 1)
    s = (qr @ kk.transpose(-1, -2)) / 8.0
    s = s.masked_fill(torch.ones(1024, 1024, device=DEV, dtype=torch.bool).triu(1), float("-inf"))
    yr = s.softmax(-1) @ vv
    yr.backward(dy.double())
    for backend in ATTENTION_TIMED:
        try:
            qq, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
            y = causal_attention(qq, k2, v2, backend)
            y.backward(dy)
            out[backend] = {"y": rel(y, yr), "dq": rel(qq.grad, qr.grad), "dk": rel(k2.grad, kr.grad), "dv": rel(v2.grad, vr.grad)}
        except Exception as e:  # a backend this build lacks
            out[backend] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def sdpa_timing():
    out = {}
    B, H, KV, T, D = 8, 32, 4, 2048, 64
    q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16)
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal: fwd 2 matmuls, bwd 5 (2.5× fwd)
    for backend in ATTENTION_TIMED:
        try:
            def f():
                y = causal_attention(q, k, v, backend)
                y.backward(dy)
            ms = bench_ms(f)
            out[backend] = {"fwd+bwd ms": round(ms, 3), "TFLOP/s": round(flops / ms / 1e9, 1)}
        except Exception as e:
            out[backend] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def check_model(kernels: KernelConfig, preset="tinyllama-120m", B=2, T=1024):
    """Loss and gradients of the fast path vs the plain model, same init and batch, bf16 autocast."""
    cfg = ModelConfig.from_name(preset)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=DEV)
    res = {}
    for fast in (False, True):
        m = bt.build_ours(cfg, DEV, kernels, fast=fast, seed=0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(ids[:, :-1], ids[:, 1:])
        loss.backward()
        res[fast] = (loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()]))
        del m
    torch._dynamo.reset()
    return {"loss_ref": res[False][0].item(), "loss_fast": res[True][0].item(),
            "loss_rel": rel(res[True][0], res[False][0]), "grad_rel": rel(res[True][1], res[False][1])}


VARIANTS = {
    "ours": (dict(), "ours"),
    "ours-cudnn": (dict(attention_backend="cudnn"), "ours"),
    "ours-flash": (dict(attention_backend="flash"), "ours"),
    "ours-nofusedce": (dict(fused_cross_entropy=False), "ours"),
    "ours-fp32res": (dict(bf16_residual=False), "ours"),
    "ours-nofuseproj": (dict(fuse_projections=False), "ours"),
    "ours-v1": (dict(bf16_residual=False, fuse_projections=False), "ours"),
    "ours-amb70": (dict(_amb=0.7), "ours"),
    "ours-amb50": (dict(_amb=0.5), "ours"),
    "ours-eager-fusedce": (dict(compile_blocks=False), "ours"),
    "ours-triton": (dict(compile_blocks=False, triton_kernels=True), "ours"),
    "ours-triton-cudnn": (dict(compile_blocks=False, triton_kernels=True, attention_backend="cudnn"), "ours"),
    "ours-fused": (dict(fused_blocks=True), "ours"),
    "ours-fused-flash": (dict(fused_blocks=True, attention_backend="flash"), "ours"),
    "ours-fa4": (dict(attention_backend="fa4"), "ours"),  # the default path with FlashAttention-4's kernels
    "ours-graph": (dict(_graph=True), "ours"),  # the step replayed from one CUDA graph (train.cuda_graph)
    "ours-fa4-graph": (dict(attention_backend="fa4", _graph=True), "ours"),
    "ours-tadamw": (dict(_adamw="triton"), "ours"),  # AdamW by tinyllama's Triton kernel (optim.fused_kernel)
    "ours-fa4-tadamw": (dict(attention_backend="fa4", _adamw="triton"), "ours"),
    "ours-fa4-graph-tadamw": (dict(attention_backend="fa4", _graph=True, _adamw="triton"), "ours"),
    "ours-graph-tadamw": (dict(_graph=True, _adamw="triton"), "ours"),  # the same with the default attention
    # + bf16 weight copies written by the Triton AdamW (optim.compute_copies)
    "ours-graph-tadamw-copies": (dict(_graph=True, _adamw="triton", _copies=True), "ours"),
    "ours-fa4-graph-tadamw-copies": (dict(attention_backend="fa4", _graph=True, _adamw="triton", _copies=True), "ours"),
    # the same with 2 cross-entropy chunks of 8,192 rows instead of 4 (fewer, larger head GEMMs; +0.5 GB)
    "ours-fa4-graph-tadamw-ce8k": (dict(attention_backend="fa4", _graph=True, _adamw="triton", ce_chunk_rows=8192), "ours"),
    "reference": (None, "reference"),
    "hf-eager": (None, "hf-eager"),
    "hf-compile": (None, "hf-compile"),
}


def step_options(kw: dict) -> tuple[dict, bool, str, bool]:
    """A variant's KernelConfig fields, and its step's pseudo-fields _graph (CUDA graph), _adamw (kernel) and
    _copies (bf16 weight copies written by AdamW)."""
    kw = dict(kw)
    return kw, bool(kw.pop("_graph", False)), kw.pop("_adamw", "torch"), bool(kw.pop("_copies", False))


def run_bench(names, cfg, mb, seq, steps, warmup, data):
    batches = bt.TokenBatches(cfg.vocab_size, seq, mb, data=data)
    out = []
    print(bt.HEADER, flush=True)
    for name in names:
        kw, kind = VARIANTS[name]
        kw, graph, adamw, copies = step_options(kw or {})
        if kind == "ours":
            def build(kw=kw):
                kw = dict(kw)
                # activation memory budget of the compile partitioner (1.0 = its default): global, so set per variant
                torch._functorch.config.activation_memory_budget = kw.pop("_amb", 1.0)
                return bt.build_ours(cfg, DEV, KernelConfig(**kw), fast=True)

            loss_of = bt._ours_loss
        elif kind == "reference":
            build, loss_of = (lambda: bt.build_ours(cfg, DEV, fast=False)), bt._ours_loss
        else:
            build, loss_of = (lambda c=(kind == "hf-compile"): bt.build_hf(cfg, DEV, compile=c)), bt.hf_loss
        r = bt.measure(name, build, loss_of, batches, cfg, DEV, steps, warmup, bt.H100_BF16_TFLOPS,
                       trainer_step=not kind.startswith("hf"), cuda_graph=graph, adamw_kernel=adamw,
                       compute_copies=copies)
        out.append(r)
    print()
    print(bt.format_table(out), flush=True)
    return out


KERNEL_KINDS = (  # first match wins; names as cuBLAS / cuDNN / our Triton kernels / PyTorch spell them
    # attention first: cuDNN's attention kernels are named ..._sdpa_sm90_flash_fprop_wgmma_...
    ("attention", ("cudnn", "flash", "fmha", "attention", "sdpa")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "wgmma")),
    ("adamw", ("adam", "fusedoptimizer")),  # ours: _adamw_kernel, _adamw_steps_kernel
    # Triton before the rest: our kernels are named by their Python function (_rms_norm_fwd ...), inductor's
    # triton_red_fused__to_copy_... (the loss), which the copies' "copy" would catch
    ("triton (norms, rotary, SwiGLU, CE)", ("triton_",)),
    ("clip / norms of grads", ("norm_kernel", "foreach_norm", "lpnorm", "multi_tensor_apply")),
    ("copies / casts", ("copy", "memcpy", "memset", "cast")),
    ("pytorch pointwise / reductions", ("at::native", "elementwise", "reduce_kernel")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys) or (kind.startswith("triton") and name.startswith("_")):
            return kind
    return "other"


def kernel_sources(p, keys: list[str], depth: int = 4) -> dict:
    """For the GPU kernels whose names contain one of `keys`: the CPU op chains (innermost first) that
    launched them, with the innermost op's input shapes, and how often (a step outside a CUDA graph)."""
    found: dict = {}
    for e in p.events():
        names = [k.name for k in getattr(e, "kernels", []) or []]
        hits = [n for n in names if any(key in n.lower() for key in keys)]
        if not hits or e.device_type.name != "CPU":
            continue
        chain, parent = [], e
        while parent is not None and len(chain) < depth:
            chain.append(parent.name)
            parent = getattr(parent, "cpu_parent", None)
        label = f"{hits[0][:40]} <- {' <- '.join(chain)} {getattr(e, 'input_shapes', '')}"
        found[label] = found.get(label, 0) + len(hits)
    return dict(sorted(found.items(), key=lambda kv: -kv[1])[:25])


def profile(kernels: KernelConfig, cfg, mb, seq, cuda_graph: bool = False, adamw: str = "torch", copies: bool = False):
    from torch.profiler import ProfilerActivity, profile as prof

    m = bt.build_ours(cfg, DEV, kernels, fast=True)
    opt, _ = bt.build_optimizer(m, fused_kernel=adamw, compute_copies=copies)
    step = bt.make_train_step(m, opt, bt._ours_loss, DEV, trainer_step=True, cuda_graph=cuda_graph)
    batches = bt.TokenBatches(cfg.vocab_size, seq, mb)
    for _ in range(3):
        step(batches.next())
    torch.cuda.synchronize()
    sources = os.environ.get("KERNEL_SOURCES")  # e.g. "memcpy,copy": which ops launch these kernels
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=bool(sources)) as p:
        for _ in range(2):
            step(batches.next())
        torch.cuda.synchronize()
    if sources:
        print("kernel sources (op chain, input shapes -> calls in 2 steps):", flush=True)
        print(json.dumps(kernel_sources(p, sources.split(",")), indent=1), flush=True)
    for key in ("self_cuda_time_total", "self_device_time_total"):
        try:
            table = p.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
            break
        except Exception:
            table = None
    # GPU time per step by kind of kernel, and the step's span (first kernel start to last kernel end)
    # user annotations (Optimizer.step#AdamW.step) also appear on the GPU timeline, spanning their kernels
    kernels = [e for e in p.events() if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
    per_kind, per_name = {}, {}
    for e in kernels:
        us = e.time_range.elapsed_us() / 2
        kind = kernel_kind(e.name)
        per_kind[kind] = per_kind.get(kind, 0.0) + us
        per_name[e.name] = per_name.get(e.name, 0.0) + us
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 2
    RESULTS["train_profile"] = {
        "step_span_ms": round(span / 1e3, 2), "kernel_sum_ms": round(sum(per_kind.values()) / 1e3, 2),
        "per_kind_ms": {k: round(v / 1e3, 2) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k[:120]: round(v / 1e3, 3) for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:40]}}
    print("train profile, ms per step:", json.dumps(RESULTS["train_profile"], indent=1), flush=True)
    if os.environ.get("OUT") and os.environ.get("TRACE"):  # tens of MB: only when asked for
        p.export_chrome_trace(os.path.join(os.environ["OUT"], "trace.json"))
    del m, opt, step
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sdpa", action="store_true")
    ap.add_argument("--profile", default=None, help="variant name from VARIANTS to profile")
    ap.add_argument("--bench", default="")
    ap.add_argument("--config", default="tinyllama-1.1b")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)
    try:
        import triton
        import transformers

        print(f"triton {triton.__version__}, transformers {transformers.__version__}", flush=True)
    except ImportError as e:
        print("missing:", e)
    t0 = time.time()
    if a.check:
        RESULTS["ce"] = check_ce()
        print("CE check:", json.dumps(RESULTS["ce"], indent=1), flush=True)
        RESULTS["attention"] = check_attention()
        print("attention check:", json.dumps(RESULTS["attention"], indent=1), flush=True)
        try:
            from tinyllama.kernels import triton_ops

            RESULTS["triton_ops"] = triton_ops.self_check()
            print("triton ops:", json.dumps(RESULTS["triton_ops"], indent=1), flush=True)
        except ImportError as e:
            print("no triton_ops:", e)
        RESULTS["model"] = {}
        for name in ("ours", "ours-eager-fusedce", "ours-triton"):
            kw = VARIANTS[name][0]
            try:
                RESULTS["model"][name] = check_model(KernelConfig(**kw))
            except Exception as e:
                RESULTS["model"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"model check {name}:", RESULTS["model"][name], flush=True)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    if a.sdpa:  # each backend against fp64 (unless --check just did), then timed
        if "attention" not in RESULTS:
            RESULTS["attention"] = check_attention()
            print("attention check:", json.dumps(RESULTS["attention"], indent=1), flush=True)
        RESULTS["sdpa"] = sdpa_timing()
        print("attention fwd+bwd (8×32q/4kv×2048×64):", json.dumps(RESULTS["sdpa"], indent=1), flush=True)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    cfg = bt.load_model_config(a.config)
    if a.profile:
        kw, graph, adamw, copies = step_options(VARIANTS[a.profile][0])
        table = profile(KernelConfig(**kw), cfg, a.micro_batch, a.seq_len, cuda_graph=graph, adamw=adamw, copies=copies)
        print(table, flush=True)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    if a.bench:
        res = run_bench(a.bench.split(","), cfg, a.micro_batch, a.seq_len, a.steps, a.warmup, a.data)
        RESULTS["bench"] = [r.__dict__ for r in res]
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "perf.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
