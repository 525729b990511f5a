"""`tinyllama bench serve`: load-test `tinyllama serve` with the official `openai` client.

Starts the server in a subprocess on 127.0.0.1 (a free port), fires --requests completions from
--clients concurrent clients (AsyncOpenAI), and reports requests/s, completion tokens/s, latency and the
engine's mean batch per decode step. Each --batch-sizes entry is one server run: 1 is one-at-a-time
serving, the baseline continuous batching is measured against.

--transformers also runs the same requests (prompts, max tokens) in this process, without HTTP, through
our `Engine` and through transformers' own continuous batching (`generate_batch`, transformers >= 5) on
the same weights, and reports both tokens/s and their ratio (greedy, no EOS stop: every request generates
--max-tokens on both sides; each side runs once untimed first, to compile and allocate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

from tinyllama.cli import _args as flag
from tinyllama.errors import TinyLlamaError, pip_extra


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory (default: --preset with random weights)")
    p.add_argument("--preset", default="tinyllama-tiny")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="16,1", help="server --max-batch-size values to compare")
    p.add_argument("--temperature", type=flag.nonnegative_float, default=0.8,
                   help="sampling temperature of every request, each with its own seed (0: greedy)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="server's CPU threads (serve --threads)")
    p.add_argument("--compile", action="store_true", help="serve --compile (and the same for our --transformers run)")
    p.add_argument("--transformers", action="store_true",
                   help="also compare our engine with transformers' continuous batching in-process (see above)")
    p.add_argument("--prefill-in-decode", type=flag.nonnegative_int, default=None,
                   help="serve --prefill-in-decode (default: the server's)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="serve --overlap / --no-overlap (default: the server's)")
    p.add_argument("--json", help="write results here")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args, batch: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinyllama", "serve", "--port", str(port), "--max-batch-size", str(batch),
           "--model-name", "bench", "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else ["--random-preset", args.preset]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.overlap is not None:
        cmd += ["--overlap" if args.overlap else "--no-overlap"]
    if args.prefill_in_decode is not None:
        cmd += ["--prefill-in-decode", str(args.prefill_in_decode)]
    if args.compile:
        cmd += ["--compile"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _prompt(i: int) -> str:
    return f"Request {i}: once upon a time"


async def _load(url: str, n_requests: int, n_clients: int, max_tokens: int, temperature: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    todo = list(range(n_requests))
    latencies, tokens, failures = [], 0, 0

    async def worker():
        nonlocal tokens, failures
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(model="bench", prompt=_prompt(i),
                                                    max_tokens=max_tokens, temperature=temperature,
                                                    seed=i if temperature > 0 else None)
                tokens += r.usage.completion_tokens
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted, reported; a load test must not hide failures
                failures += 1
                print(f"request {i} failed: {e}", file=sys.stderr)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    dt = time.perf_counter() - t0
    await client.close()
    latencies.sort()
    pct = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan"))
    return {"seconds": round(dt, 2), "requests_per_s": round(n_requests / dt, 2), "tokens_per_s": round(tokens / dt, 1),
            "completion_tokens": tokens, "failures": failures, "p50_s": round(pct(0.5), 3), "p95_s": round(pct(0.95), 3)}


def compare_with_transformers(args, max_batch_size: int) -> dict:
    """Our Engine (all requests submitted at once, stepped to the end) vs transformers' `generate_batch` on
    the same prompts and weights; greedy without EOS, one untimed run each first."""
    import torch
    import transformers

    from tinyllama.bench.generate import build_hf
    from tinyllama.loading import load_model_and_tokenizer
    from tinyllama.generate import SamplingConfig
    from tinyllama.serve.engine import Engine, run_to_completion

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, None if args.model else args.preset, args.device,
                                                args.dtype)
    hf = build_hf(model, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype)  # before fusing ours
    if not hasattr(hf, "generate_batch"):
        raise TinyLlamaError(f"bench serve --transformers needs transformers' continuous batching (generate_batch, "
                             f"transformers >= 5); transformers {transformers.__version__} is installed")
    prompts = [tokenizer.encode(_prompt(i), bos=True) for i in range(args.requests)]
    engine = Engine(model, max_batch_size=max_batch_size, compile=args.compile, fuse=args.compile, overlap=args.overlap)
    engine.warmup()
    sampling = SamplingConfig(max_new_tokens=args.max_tokens, stop_at_eos=False)
    gen_config = transformers.GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1,
                                               pad_token_id=0)
    # Sized like ours: as many requests per batch as our slots, KV pages for max_batch_size whole requests,
    # one step's tokens at most a full prefill of our slots (transformers' defaults take ~60 % of free memory)
    page = 256
    longest = max(map(len, prompts)) + args.max_tokens
    import inspect

    accepted = inspect.signature(transformers.ContinuousBatchingConfig).parameters
    sizing = {"max_requests_per_batch": max_batch_size, "num_blocks": max_batch_size * -(-longest // page),
              "max_batch_tokens": max(page, max_batch_size * max(map(len, prompts))),
              # the KV page size is `page_size` in newer releases, `block_size` before
              ("page_size" if "page_size" in accepted else "block_size"): page}
    cb_config = transformers.ContinuousBatchingConfig(**{k: v for k, v in sizing.items() if k in accepted})

    def ours() -> list:
        return run_to_completion(engine, prompts, sampling)

    def theirs() -> list:
        # persistent: the timed call reuses the manager the untimed one built and warmed up
        out = hf.generate_batch(prompts, generation_config=gen_config, continuous_batching_config=cb_config,
                                persistent_manager=True)
        return [list(r.generated_tokens) for r in out.values()]  # in the order of the inputs

    timings = {}
    for name, fn in (("ours", ours), ("transformers", theirs)):
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        timings[name] = {"seconds": round(dt, 3), "completion_tokens": sum(map(len, tokens)),
                         "tokens_per_s": round(sum(map(len, tokens)) / dt, 1), "tokens": tokens}
    hf.destroy_cached_continuous_batching_manager()
    ours_t, theirs_t = (timings[k].pop("tokens") for k in ("ours", "transformers"))
    same = sum(a == b for a, b in zip(ours_t, theirs_t))
    return {"transformers_version": transformers.__version__, "max_batch_size": max_batch_size,
            "compile": bool(args.compile), "ours": timings["ours"], "transformers": timings["transformers"],
            "ratio_tokens_per_s": round(timings["ours"]["tokens_per_s"] / timings["transformers"]["tokens_per_s"], 2),
            "requests_with_identical_tokens": f"{same}/{len(prompts)}"}


def engine_time(before: dict, after: dict, seconds: float) -> dict:
    """Where the engine thread's time went during a run, from two /health readings (EngineStats): per decode
    step, the wall time, the wait for the device's tokens and the host work (the rest of the step: admitting,
    sampling calls, emitting; prefill passes apart), and the share of the run spent in prefill passes and idle."""
    d = {k: after[k] - before[k] for k in ("decode_steps", "step_s", "wait_s", "prefill_s", "prefills")}
    steps, seconds = max(d["decode_steps"], 1), max(seconds, 1e-9)
    return {"decode_steps": d["decode_steps"], "prefills": d["prefills"],
            "wall_ms_per_step": round(seconds / steps * 1e3, 3),
            "wait_ms_per_step": round(d["wait_s"] / steps * 1e3, 3),
            "host_ms_per_step": round((d["step_s"] - d["wait_s"] - d["prefill_s"]) / steps * 1e3, 3),
            "prefill_share": round(d["prefill_s"] / seconds, 3),
            "idle_share": round(max(0.0, seconds - d["step_s"]) / seconds, 3)}


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> Optional[str]:
    """Poll the server's /health until it answers 200; None, or why it did not come up."""
    import httpx

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            return f"server exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            return f"server did not come up in {timeout:.0f} s"
        time.sleep(0.2)


def measure_load(url: str, requests: int, clients: int, max_tokens: int, temperature: float) -> dict:
    """A warm-up (one short request per client), then the measured load; its numbers with the engine's mean
    batch and time split over the measured part (from /health before and after)."""
    import httpx

    asyncio.run(_load(url, min(clients, requests), clients, 4, temperature))
    before = httpx.get(url + "/health").json()["engine"]
    r = asyncio.run(_load(url, requests, clients, max_tokens, temperature))
    after = httpx.get(url + "/health").json()["engine"]
    steps = after["decode_steps"] - before["decode_steps"]
    r["mean_seqs_per_decode_step"] = round((after["decode_rows"] - before["decode_rows"]) / max(steps, 1), 2)
    r["engine_time"] = engine_time(before, after, r["seconds"])
    return r


def run(args) -> int:
    try:
        import httpx  # noqa: F401  (both imported here so a missing client fails before any server starts)
        import openai  # noqa: F401
    except ImportError as e:
        raise TinyLlamaError(f"tinyllama bench serve needs the openai client ({e.name or e} is missing): "
                             f"{pip_extra('bench')}") from None
    results = []
    report = {"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "prefill_in_decode": args.prefill_in_decode,
              "overlap": args.overlap,  # None: the server's default
              "model": args.model or args.preset, "compile": bool(args.compile), "results": results}

    def save() -> None:  # after every measurement: a run stopped early keeps what it measured
        if args.json:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2)
            os.replace(tmp, args.json)

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        port = _free_port()
        proc = _start_server(args, batch, port)
        url = f"http://127.0.0.1:{port}"
        try:
            problem = wait_until_up(url, proc)
            if problem:
                print(problem, file=sys.stderr)
                return 2
            r = measure_load(url, args.requests, args.clients, args.max_tokens, args.temperature)
            r["max_batch_size"] = batch
            results.append(r)
            save()
            print(f"max_batch_size {batch:3d}: {r['requests_per_s']:7.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
                  f"p50 {r['p50_s']:.3f} s  p95 {r['p95_s']:.3f} s  mean batch {r['mean_seqs_per_decode_step']:5.2f}  "
                  f"failures {r['failures']}", flush=True)
            t = r["engine_time"]
            print(f"  per decode step {t['wall_ms_per_step']:.3f} ms: waiting for the device {t['wait_ms_per_step']:.3f}, "
                  f"host {t['host_ms_per_step']:.3f}; prefill passes {t['prefills']} ({100 * t['prefill_share']:.1f} % "
                  f"of the run), engine idle {100 * t['idle_share']:.1f} %", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.transformers:
        c = compare_with_transformers(args, max(int(b) for b in args.batch_sizes.split(",")))
        report["vs_transformers_continuous_batching"] = c
        print(f"in-process, {args.requests} requests x {args.max_tokens} tokens: ours {c['ours']['tokens_per_s']:.1f} "
              f"tok/s, transformers {c['transformers_version']} generate_batch {c['transformers']['tokens_per_s']:.1f} "
              f"tok/s, ratio {c['ratio_tokens_per_s']:.2f}; identical outputs {c['requests_with_identical_tokens']}",
              flush=True)
    save()
    return 0 if all(r["failures"] == 0 for r in results) else 1
