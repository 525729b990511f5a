"""Where does the batched prefill of `bench generate` go? (issue 15, the 32-row decode goal)

python perf/prefill_profile.py [--rows 32] [--prompt-len 128] [--masked] [--out prefill_profile.json]

At 32 rows the bench's end-to-end rate counts one prefill of 32 × 128 tokens (14.7 ms on the H200, 5 % of the
run; perf/NOTES.md, twenty-first session) beside 255 decode steps. This builds the 1.1B as the bench does
(random weights, bf16, the fused copy, `DecodeEngine(compile=True)`), times the prefill as the bench does (the
captured graph, median of 10 replays after two warm-up calls), then profiles 5 replays and sums the GPU kernel
time per prefill by kind (`gpu_perf.kernel_kind`: matmul, attention, Triton/inductor, copies, ...), with the top kernels and
the GEMMs' rate against the linear layers' FLOPs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections import defaultdict
from types import SimpleNamespace

import torch

from tinyllama.bench.generate import build_model
from tinyllama.generate import DecodeEngine

from gpu_perf import kernel_kind  # perf/: the training profile's kinds (attention, matmul, triton, copies, ...)

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256, help="cache length = prompt + this, as the bench")
    ap.add_argument("--masked", action="store_true", help="also the prefill over the whole cache with a mask (before from_start)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_profile.json"))
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = build_model(SimpleNamespace(model=None, preset=args.preset), device, dtype)
    fast = copy.deepcopy(model)
    del model
    engine = DecodeEngine(fast, compile=True, fuse=True)
    B, P = args.rows, args.prompt_len
    engine.ensure_cache(B, P + args.new_tokens)
    torch.manual_seed(0)
    ids = torch.randint(0, fast.config.vocab_size, (B, P), device=device)
    forms = {"from_start": engine._prefill}
    if args.masked:
        forms["masked"] = torch.compile(_masked_prefill, fullgraph=True)
    results = {}
    for form, step in forms.items():
        engine._prefill = step  # the engine's compiled prefill; its graphs are keyed by shape, so drop them
        engine._prefill_graphs.clear()
        engine._prefill_seen.clear()
        results[form] = profile_prefill(engine, ids, fast.config, form)
    with open(args.out, "w") as f:
        json.dump(results if len(results) > 1 else results["from_start"], f, indent=1)


def _masked_prefill(model, ids, input_pos, rope_pos, key_mask, slots=None, logits_at=None):
    """The prefill as before the twenty-second session's from_start: over the whole cache with a mask (the head
    on the last column, as now)."""
    last = torch.full((ids.size(0),), ids.size(1) - 1, dtype=torch.long, device=ids.device)
    return model(ids, input_pos=input_pos, logits_at=last)


def profile_prefill(engine: DecodeEngine, ids: torch.Tensor, c, form: str) -> dict:
    B, P = ids.shape
    with torch.inference_mode():
        for _ in range(3):  # run, run + capture, replay
            engine.prefill(ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            engine.prefill(ids)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        prefill_ms = sorted(times)[len(times) // 2]
        reps = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                engine.prefill(ids)
            torch.cuda.synchronize()
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():  # GPU kernels (user annotations also appear on the GPU timeline: not those)
        if event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False):
            per_kernel[event.name][0] += event.time_range.elapsed_us() / 1e3 / reps  # ms per prefill
            per_kernel[event.name][1] += 1
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kernel_kind(name)] += ms
    kernel_ms = sum(by_kind.values())
    linear_params = c.n_layers * (c.hidden_size * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
                                  + c.n_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    linear_tflop = 2 * linear_params * B * P / 1e12  # the head runs on the last column only
    gemm_ms = by_kind.get("matmul", 0.0)
    print(f"prefill ({form}) {B} x {P} on {torch.cuda.get_device_name()}: {prefill_ms:.2f} ms (graph replay, median of 10); "
          f"GPU kernels {kernel_ms:.2f} ms; linear layers {linear_tflop:.2f} TFLOP -> "
          f"{linear_tflop / prefill_ms * 1e3:.0f} TFLOP/s over the prefill"
          + (f", {linear_tflop / gemm_ms * 1e3:.0f} over the GEMM kernels" if gemm_ms else ""))
    print("| kind | ms per prefill | share |\n| --- | ---: | ---: |")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.3f} | {ms / kernel_ms:.1%} |")
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    print("| kernel | kind | ms per prefill | launches per prefill |\n| --- | --- | ---: | ---: |")
    for name, (ms, n) in top:
        print(f"| {name[:90]} | {kernel_kind(name)} | {ms:.3f} | {n / reps:.0f} |")
    return {"form": form, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": B, "prompt_len": P,
            "prefill_ms": round(prefill_ms, 3), "kernel_ms": round(kernel_ms, 3), "linear_tflop": round(linear_tflop, 3),
            "by_kind_ms": {k: round(v, 3) for k, v in by_kind.items()},
            "top": [{"name": n, "kind": kernel_kind(n), "ms": round(ms, 4), "launches": k / reps} for n, (ms, k) in top]}


if __name__ == "__main__":
    main()
