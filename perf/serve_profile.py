"""Where a serve engine step goes: the compiled decode step on the GPU vs everything around it on the host.

python perf/serve_profile.py [--preset tinyllama-1.1b] [--rows 16] [--tokens 64]
For each sampling mode (greedy; temperature 0.8 in one batched draw; temperature 0.8 with a seed per
request, drawn row by row) it runs `rows` requests to completion through `serve.engine.Engine` (the path
`tinyllama serve --compile` runs, without HTTP) and reports tokens/s, the time per engine step, and the time
inside the decode step alone (synchronized), so the rest is host work: building inputs, sampling, emitting.
Each mode first runs once unmeasured: on the H200 (2026-12-02) the first, untimed run of a mode took 4.0-4.8 ms
per step and the timed one after it 2.1-2.3 ms, so a cold run must not stand for the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tinyllama.config import ModelConfig
from tinyllama.generate import SamplingConfig
from tinyllama.model import Llama
from tinyllama.serve.engine import Engine, Sequence


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill-in-decode", type=int, default=0,
                    help="Engine's prefill_in_decode (default 0: every prompt prefilled, steps are all decode)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "serve_profile.json"))
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = Llama(ModelConfig.from_name(a.preset))
    model = model.to(dtype).eval()
    model.rope_cos.data, model.rope_sin.data = model.rope_cos.float(), model.rope_sin.float()
    engine = Engine(model, max_batch_size=a.rows, max_seq_len=512, compile=dev.type == "cuda", fuse=True,
                    prefill_in_decode=a.prefill_in_decode)
    print(f"warm-up (compile) {engine.warmup():.0f} s, buckets {engine.decode_buckets}", flush=True)
    step_time = [0.0]
    inner = engine.decoder.step

    def timed_step(*args, **kw):  # synchronized before and after: the decode step's own time
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        step_time[0] += time.perf_counter() - t0
        return out

    prompts = [list(range(3, 3 + 16 + i)) for i in range(a.rows)]
    modes = {"greedy": lambda i: SamplingConfig(max_new_tokens=a.tokens, stop_at_eos=False),
             "sampled": lambda i: SamplingConfig(max_new_tokens=a.tokens, temperature=0.8, stop_at_eos=False),
             "sampled, seed per request": lambda i: SamplingConfig(max_new_tokens=a.tokens, temperature=0.8,
                                                                   seed=i, stop_at_eos=False)}
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "rows": a.rows,
              "tokens": a.tokens, "modes": {}}
    for name, cfg_of in modes.items():
        # warm-up; untimed: the end-to-end rate; timed: the step's share (adds syncs)
        for run in ("warm-up", "untimed", "timed"):
            timed = run == "timed"
            engine.decoder.step = timed_step if timed else inner
            step_time[0] = 0.0
            steps0 = engine.stats.decode_steps
            outs = []
            t0 = time.perf_counter()
            done = [False] * a.rows
            for i, p in enumerate(prompts):
                outs.append([])
                engine.submit(Sequence(p, cfg_of(i), on_token=outs[i].append,
                                       on_finish=lambda r, e, i=i: done.__setitem__(i, True)))
            while not all(done):
                engine.step()
            dt = time.perf_counter() - t0
            steps = engine.stats.decode_steps - steps0
            n = sum(map(len, outs))
            row = report["modes"].setdefault(name, {})
            if run == "warm-up":
                row.update(warm_up_engine_step_ms=round(dt / steps * 1e3, 3))
            elif timed:
                row.update(decode_step_ms=round(step_time[0] / steps * 1e3, 3),
                           engine_step_ms_with_syncs=round(dt / steps * 1e3, 3))
            else:
                row.update(tokens_per_s=round(n / dt, 1), engine_step_ms=round(dt / steps * 1e3, 3), steps=steps)
        engine.decoder.step = inner
        r = report["modes"][name]
        print(f"{name:<28} {r['tokens_per_s']:>9.1f} tok/s | engine step {r['engine_step_ms']:.3f} ms | "
              f"decode step alone {r['decode_step_ms']:.3f} ms", flush=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
