"""`tinyllama bench data`: `prepare` tokens/s over a real corpus, and mixture-loader blocks/s.

Default corpus: ../shared/data/corpus of a checkout (SlimPajama-format .jsonl.zst + StarCoder-format
.parquet), else the embedded demo corpus. All files are prepared into one dataset (timed); the loader
is timed on it as one source and as a 0.7 : 0.3 mixture of two sources (the same data under two names:
the loader's cost does not depend on what the tokens are).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tinyllama.checks import NONNEGATIVE_INT, POSITIVE_INT
from tinyllama.cli import _args as flag


def _default_corpus() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data" / "corpus"
        if cand.is_dir():
            return cand
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, default=None,
                   help="directory with *.jsonl.zst and/or *.parquet (default: ../shared/data/corpus, else the demo)")
    p.add_argument("--workers", type=flag.number_list(**POSITIVE_INT), default="1,2", help="comma-separated prepare worker counts to time (default 1,2)")
    p.add_argument("--seq-len", type=flag.positive_int, default=2048)
    p.add_argument("--batch-size", type=flag.positive_int, default=8)
    p.add_argument("--loader-workers", type=flag.number_list(**NONNEGATIVE_INT), default="0,2", help="comma-separated loader num_workers to time")
    p.add_argument("--batches", type=flag.positive_int, default=400, help="batches timed per loader setting")
    p.add_argument("--keep", type=Path, default=None, help="write the prepared datasets here instead of a temp dir")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the reference: the plain tokenizer's encode_batch over the same documents")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    from tinyllama.data import MixtureLoader, prepare
    from tinyllama.data.demo import demo_inputs
    from tinyllama.tokenizer import Tokenizer

    corpus = args.corpus or _default_corpus()
    if corpus is not None:
        files = sorted([*corpus.glob("*.jsonl.zst"), *corpus.glob("*.parquet")])
    else:
        files = list(demo_inputs().values())
    tok = Tokenizer()
    root = Path(args.keep or tempfile.mkdtemp(prefix="tinyllama-bench-data-"))
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
                     "corpus": str(corpus or "embedded demo"), "prepare": [], "loader": []}
    print(f"corpus: {results['corpus']}  ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB on disk)")
    out = root / "corpus"
    try:
        for w in args.workers:
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            m = prepare(files, out, workers=w, tokenizer=tok, val_fraction=0.005)
            dt = time.perf_counter() - t0
            tokens, docs = m["run"]["tokens"], m["run"]["docs"]
            row = {"workers": w, "documents": docs, "tokens": tokens, "seconds": round(dt, 2),
                   "tokens_per_s": round(tokens / dt)}
            results["prepare"].append(row)
            print(f"prepare --workers {w}: {docs:,} docs, {tokens:,} tokens in {dt:.1f} s = {tokens / dt:,.0f} tokens/s")

        if not args.no_baseline:
            from tinyllama.data.readers import Record, read_records

            texts = [r.text for f in files for r in read_records(f) if isinstance(r, Record)]
            t0 = time.perf_counter()
            n = sum(len(ids) + 1 for i in range(0, len(texts), 1024) for ids in tok.encode_batch(texts[i:i + 1024]))
            dt = time.perf_counter() - t0
            results["baseline_tokenizer_tokens_per_s"] = round(n / dt)
            print(f"reference: Tokenizer.encode_batch alone (texts in memory, no I/O): {n:,} tokens in {dt:.1f} s "
                  f"= {n / dt:,.0f} tokens/s")
        mixes = {"1 source": ([(out, 1.0)], None), "2 sources 0.7:0.3": ([(out, 0.7), (out, 0.3)], ["web", "code"])}
        for (mix, (sources, names)), nw in [(m, nw) for m in mixes.items() for nw in args.loader_workers]:
            loader = MixtureLoader(sources, args.seq_len, args.batch_size, seed=0, num_workers=nw, names=names)
            for _ in range(5):
                next(loader)  # warm-up (worker start-up, page cache)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            dt = time.perf_counter() - t0
            blocks = args.batches * args.batch_size
            row = {"mixture": mix, "num_workers": nw, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "blocks_per_s": round(blocks / dt), "tokens_per_s": round(blocks * (args.seq_len + 1) / dt)}
            results["loader"].append(row)
            print(f"loader {mix}, num_workers={nw}, seq_len={args.seq_len} batch={args.batch_size}: {blocks / dt:,.0f} blocks/s "
                  f"({blocks * (args.seq_len + 1) / dt / 1e6:,.1f} M tokens/s)")
            loader.close()
        # Resume cost: restoring a state deep into training is O(1) (no replay of the past).
        sources, names = mixes["2 sources 0.7:0.3"]
        loader = MixtureLoader(sources, args.seq_len, args.batch_size, seed=0, names=names)
        state = loader.state_dict()
        state["samples"] = 10**9
        for s in state["sources"]:
            s["blocks"], s["epoch"], s["pos"] = 5 * 10**8, 3, 7
        t0 = time.perf_counter()
        loader.load_state_dict(state)
        next(loader)
        results["resume_ms_at_1e9_samples"] = round((time.perf_counter() - t0) * 1e3, 2)
        print(f"resume at global sample 10^9 and first batch: {results['resume_ms_at_1e9_samples']} ms")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0
