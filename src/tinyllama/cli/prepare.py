"""`tinyllama prepare INPUT... --output DIR`: tokenize raw corpora into packed token shards."""

from __future__ import annotations

import argparse

from tinyllama.data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Tokenize raw corpora (.jsonl, .jsonl.zst, .json.gz, .parquet, .txt; files, directories or globs) into a "
        "dataset directory of packed token shards plus manifest.json. Each document is stored as its ids + </s>. "
        "Re-running skips input files already finished. With no INPUT, prepares the embedded demo corpus "
        "(prose and code) into DIR/prose and DIR/code."
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="input files, directories or glob patterns")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="dataset directory to write")
    p.add_argument("--name", help="source name recorded in the manifest (default: the directory name)")
    p.add_argument("--field", help="JSON field / parquet column holding the text (default: 'text', then 'content')")
    p.add_argument("--drop", action="append", default=[], metavar="FIELD.PATH=VALUE",
                   help="drop records whose field equals VALUE, e.g. meta.redpajama_set_name=RedPajamaGithub "
                        "(TinyLlama's SlimPajama filter); repeatable")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"fraction of documents held out for validation (default {DEFAULT_VAL_FRACTION}; "
                        "for the demo corpus 0.02)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes, one input file each at a time")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) malformed records instead of stopping at the first one")
    p.add_argument("--shard-index", type=int, default=0, help="this machine's part (with --num-shards)")
    p.add_argument("--num-shards", type=int, default=1, help="split the input files across this many machines")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per output shard")
    p.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model / directory (default: the Llama 2 tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tinyllama.data.prepare import prepare

    val_fraction = args.val_fraction
    if not args.inputs:
        from tinyllama.data.demo import DEMO_VAL_FRACTION, demo_inputs

        jobs = [([path], Path(args.output) / name, name) for name, path in demo_inputs().items()]
        val_fraction = DEMO_VAL_FRACTION if val_fraction is None else val_fraction
    else:
        jobs = [(args.inputs, Path(args.output), args.name)]
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    for inputs, out, name in jobs:
        m = prepare(inputs, out, name=name, field=args.field, val_fraction=val_fraction, workers=args.workers,
                    skip_bad=args.skip_bad, filters=args.drop, shard_index=args.shard_index,
                    num_shards=args.num_shards, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                    progress=not args.no_progress)
        run_stats = m["run"]
        tr, va = m["splits"]["train"], m["splits"]["val"]
        skipped = sum(i["skipped"] for i in m["inputs"])
        filtered = sum(i["filtered"] for i in m["inputs"])
        rate = run_stats["tokens"] / max(run_stats["seconds"], 1e-9)
        print(f"{out}: train {tr['documents']:,} docs / {tr['tokens']:,} tokens in {len(tr['shards'])} shards, "
              f"val {va['documents']:,} docs / {va['tokens']:,} tokens; this run {run_stats['tokens']:,} tokens "
              f"in {run_stats['seconds']:.1f} s ({rate:,.0f} tokens/s)")
        if filtered:
            print(f"  dropped by --drop filters: {filtered:,} records")
        if skipped:
            print(f"  skipped {skipped:,} bad records (--skip-bad):")
            for i in m["inputs"]:
                for ex in i["skipped_examples"]:
                    print(f"    {ex}")
        if not m["complete"]:
            print(f"  incomplete: {len(m['pending_inputs'])} input file(s) left for other --shard-index runs")
    return 0
