"""Where a Triton decode step's time goes, kernel by kernel, at batch 1 and at larger batches.

python perf/triton_step_profile.py [--batches 1,8] [--pos 256[,384...]] [--out triton_step_profile.json]
Runs `kernels.decode.TritonDecodeStep` of a random-weight TinyLlama-1.1B (bf16, fused) eagerly under
torch.profiler (CUDA kernel times; a graph replay would show as one event) with every row at position
`pos`, and reports the GPU time per step of each kernel (the rows / GEMV products, the attention, the rest),
next to the step's time as a CUDA-graph replay. With programmatic dependent launch a kernel starts before the one
before it ends and its duration includes that wait, so each is also given its exposed time: from the later of its
start and the previous kernels' end to its own end (the exposed times add up to the span the kernels cover).
Products run at their first (untuned) block shape unless --tune. Several positions (--pos 129,384): tuned at the first, then each profiled with the same kernels, to
show which kernel's time grows with the cache.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tinyllama.checks import POSITIVE_INT
from tinyllama.cli._args import number_list
from tinyllama.config import ModelConfig
from tinyllama.kernels.decode import TritonDecodeStep
from tinyllama.model import Llama


def random_decode_model(dev: torch.device) -> Llama:
    """A random-weight TinyLlama-1.1B in bf16 with fused projections and fp32 rotary tables, as the Triton
    decode step runs it (speed does not depend on weight values)."""
    torch.manual_seed(0)
    with torch.device(dev):
        model = Llama(ModelConfig.from_name("tinyllama-1.1b"))
    model = model.to(torch.bfloat16).eval().fuse_projections()
    model.rope_cos.data, model.rope_sin.data = model.rope_cos.float(), model.rope_sin.float()
    return model


def exposed_us(ranges: list[tuple[float, float]]) -> list[float]:
    """For kernel (start, end) times in launch order: the part of each after every earlier kernel has ended."""
    out, frontier = [], float("-inf")
    for start, end in ranges:
        out.append(max(0.0, end - max(start, frontier)))
        frontier = max(frontier, end)
    return out


def _profile_step(model, eager, B, ids, pos, report, chosen: bool) -> None:
    """Profile `eager`'s step kernel by kernel, then time a graphed step with the same tiles; append to
    report["batches"] and print."""
    for _ in range(3):
        eager.step(ids, pos)
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            eager.step(ids, pos)
        torch.cuda.synchronize()
    per_kernel, per_product = defaultdict(float), defaultdict(float)
    exposed_kernel, exposed_product = defaultdict(float), defaultdict(float)
    # the step's products run in a fixed order (TritonDecodeStep._layers): label them by their place
    labels = eager.product_names
    k = 0
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    exposed = exposed_us([(e.time_range.start, e.time_range.end) for e in events])
    for e, exp in zip(events, exposed):
        us = e.time_range.elapsed_us() / n
        per_kernel[e.name] += us
        exposed_kernel[e.name] += exp / n
        if e.name in ("_gemv_kernel", "_rows_kernel"):
            per_product[labels[k % len(labels)]] += us
            exposed_product[labels[k % len(labels)]] += exp / n
            k += 1
    graphed = TritonDecodeStep(model, use_graph=True, batch_size=B, tune=False)
    # the same tiles, attention splits and merging of split-K sums as the profiled steps
    graphed.configs, graphed.deferred_configs = eager.configs, eager.deferred_configs
    graphed.deferred, graphed.attention_config = eager.deferred, eager.attention_config
    for _ in range(3):
        graphed.step(ids, pos)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graphed.step(ids, pos)
    end.record()
    end.synchronize()
    graph_us = start.elapsed_time(end) * 1e3 / 50
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    total = sum(per_kernel.values())
    # weight bytes each product reads per step, for its bandwidth (GB/s = bytes / us / 1e3)
    weight_bytes = {label: sum(m.weight.numel() * m.weight.element_size() for m in mods) for label, mods in {
        "qkv": [l.self_attn.qkv_proj for l in model.layers], "o": [l.self_attn.o_proj for l in model.layers],
        "gate_up": [l.mlp.gate_up_proj for l in model.layers], "down": [l.mlp.down_proj for l in model.layers],
        "head": [model.lm_head]}.items()}
    products = {p: {"us": round(us, 1), "exposed_us": round(exposed_product[p], 1),
                    "TB_per_s": round(weight_bytes[p] / us / 1e6, 2)} for p, us in per_product.items()}
    configs = eager.deferred_configs if eager.deferred else eager.configs
    report["batches"].append({"batch": B, "pos": int(pos[0]), "deferred": eager.deferred, "chosen": chosen,
                              "step_us_tuned": eager.step_times, "graph_step_us": round(graph_us, 1),
                              "kernel_sum_us": round(total, 1), "tiles": sorted({str(c) for c in configs}),
                              "products": products, "kernels_us": {k: round(v, 1) for k, v in kernels},
                              "kernels_exposed_us": {k: round(exposed_kernel[k], 1) for k, _ in kernels}})
    print(f"batch {B} at position {int(pos[0])}{', deferred sums' if eager.deferred else ''}{' (chosen)' if chosen else ''}: graph replay "
          f"{graph_us:.1f} us per step; kernels (eager) sum {total:.1f} us; tuned {eager.step_times}", flush=True)
    for k, v in kernels[:8]:
        print(f"   {v:8.1f} us ({exposed_kernel[k]:7.1f} exposed)  {k[:90]}", flush=True)
    tile = dict(zip(labels, configs))  # one per product kind (the tuning keys on the shape)
    for p, r in products.items():
        print(f"   {p:>8}: {r['us']:8.1f} us ({r['exposed_us']:7.1f} exposed), weights at {r['TB_per_s']:.2f} TB/s  "
              f"{tile[p]}", flush=True)
    print(f"   attention {eager.attention_config}", flush=True)
    if eager.l2_times:  # each product's tuned tile, µs over all layers per l2_ahead (0: no L2 prefetch)
        report["batches"][-1]["l2_ahead_us_tuned"] = eager.l2_times
        print(f"   L2 prefetch (K-blocks ahead: us) {eager.l2_times}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--pos", type=number_list(**POSITIVE_INT), default=[256],
                    help="cache positions of every row, comma-separated; the tuning runs at the first")
    ap.add_argument("--tune", action="store_true", help="tune the products' tiles first (default: the first candidates)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "triton_step_profile.json"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    model = random_decode_model(dev)
    report = {"device": torch.cuda.get_device_name(dev), "positions": a.pos, "batches": []}
    for B in [int(b) for b in a.batches.split(",")]:
        model.setup_cache(B, max(512, max(a.pos) + 1))
        ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        pos = torch.full((B,), a.pos[0], dtype=torch.long, device=dev)
        with torch.inference_mode():
            # with --tune at 2+ rows both ways of adding split-K sums are tuned and timed (deferred=None, the
            # default)
            eager = TritonDecodeStep(model, use_graph=False, batch_size=B, tune=a.tune)
            eager.step(ids, pos)
            chosen = eager.deferred
            # at 2+ rows both steps, the one the tuning chose first: split-K sums merged by the product's last
            # program, or deferred to the next kernel (TritonDecodeStep.deferred)
            for position in a.pos:
                pos.fill_(position)
                for deferred in ([chosen, not chosen] if B > 1 and a.tune else [chosen]):
                    eager.deferred = deferred
                    _profile_step(model, eager, B, ids, pos, report, chosen=deferred == chosen)
        model.clear_cache()
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
