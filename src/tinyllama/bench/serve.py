"""`tinyllama bench serve`: load-test `tinyllama serve` with the official `openai` client.

Starts the server in a subprocess on 127.0.0.1 (a free port), fires --requests completions from
--clients concurrent clients (AsyncOpenAI), and reports requests/s, completion tokens/s, latency and the
engine's mean batch per decode step. Each --batch-sizes entry is one server run: 1 is one-at-a-time
serving, the baseline continuous batching is measured against.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory (default: --preset with random weights)")
    p.add_argument("--preset", default="tinyllama-tiny")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="16,1", help="server --max-batch-size values to compare")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="server's CPU threads (serve --threads)")
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
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _load(url: str, n_requests: int, n_clients: int, max_tokens: int) -> dict:
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
                r = await client.completions.create(model="bench", prompt=f"Request {i}: once upon a time",
                                                    max_tokens=max_tokens, temperature=0.8, seed=i)
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


def run(args) -> int:
    import httpx

    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        port = _free_port()
        proc = _start_server(args, batch, port)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    print(f"server exited with {proc.returncode}", file=sys.stderr)
                    return 2
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    print("server did not come up in 300 s", file=sys.stderr)
                    return 2
                time.sleep(0.2)
            # warm-up, then the measured run
            asyncio.run(_load(url, min(args.clients, args.requests), args.clients, 4))
            before = httpx.get(url + "/health").json()["engine"]
            r = asyncio.run(_load(url, args.requests, args.clients, args.max_tokens))
            after = httpx.get(url + "/health").json()["engine"]
            steps = after["decode_steps"] - before["decode_steps"]
            r["mean_seqs_per_decode_step"] = round((after["decode_rows"] - before["decode_rows"]) / max(steps, 1), 2)
            r["max_batch_size"] = batch
            results.append(r)
            print(f"max_batch_size {batch:3d}: {r['requests_per_s']:7.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
                  f"p50 {r['p50_s']:.3f} s  p95 {r['p95_s']:.3f} s  mean batch {r['mean_seqs_per_decode_step']:5.2f}  "
                  f"failures {r['failures']}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
                       "model": args.model or args.preset, "results": results}, f, indent=2)
    return 0 if all(r["failures"] == 0 for r in results) else 1
