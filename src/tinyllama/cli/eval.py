"""`tinyllama eval`: perplexity and multiple-choice benchmarks; a table on screen and a JSON file.

    tinyllama eval --model out/hf --tasks hellaswag=hellaswag_val.jsonl arc_easy=ARC-Easy-Test.jsonl \
        mmlu:5=mmlu/data --perplexity wiki.test.txt --output results.json
"""

from __future__ import annotations

import sys

from tinyllama.config import config_from_args as load_from_args
from tinyllama.cli._args import add_device_arguments
from tinyllama.errors import TinyLlamaError
from tinyllama.eval.run import EvalConfig, evaluate, write_json_atomic


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML file of EvalConfig fields (command-line flags override it)")
    p.add_argument("--model", help="Hugging Face model directory, or a Hub id org/name[@revision]")
    p.add_argument("--random-preset", metavar="NAME", help="a randomly initialised preset instead of --model (smoke test)")
    p.add_argument("--tasks", nargs="*", metavar="NAME[:SHOTS]=PATH",
                   help="multiple-choice tasks: hellaswag, arc_easy, arc_challenge, winogrande, piqa, boolq, "
                        "openbookqa, mmlu (e.g. mmlu:5=data/ for 5-shot)")
    p.add_argument("--perplexity", nargs="*", metavar="PATH",
                   help="perplexity of .txt/.jsonl(.zst)/.parquet files or prepared dataset directories")
    p.add_argument("--split", help="prepared-dataset split for --perplexity (default val)")
    p.add_argument("--text-field", "--field", dest="text_field",
                   help="JSONL field / parquet column holding the text (default text; parquet falls back to content)")
    p.add_argument("--window", type=int, help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--limit", type=int, help="only the first N items/documents of each task (not a real result)")
    p.add_argument("--batch-size", type=int)
    add_device_arguments(p)
    p.add_argument("--output", help="write results as JSON here (default: print only)")


def config_from_args(args) -> EvalConfig:
    cfg = load_from_args(EvalConfig, args)
    if not cfg.tasks and not cfg.perplexity:
        raise TinyLlamaError("nothing to evaluate: give --tasks NAME=PATH ... and/or --perplexity PATH ...")
    return cfg


def print_table(results: dict, out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default bound at import outlives a replaced sys.stdout
    rows = [("task", "n", "acc", "± stderr", "acc_norm", "± stderr")]
    for name, r in results.get("tasks", {}).items():
        rows.append((name, str(r["n"]), f"{r['acc']:.4f}", f"{r['acc_stderr']:.4f}", f"{r['acc_norm']:.4f}",
                     f"{r['acc_norm_stderr']:.4f}"))
    if len(rows) > 1:
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, r in enumerate(rows):
            print("  ".join(c.ljust(w[j]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(r)), file=out)
            if i == 0:
                print("  ".join("-" * x for x in w), file=out)
    for name, r in results.get("perplexity", {}).items():
        bpb = f", {r['bits_per_byte']:.4f} bits/byte" if r.get("bits_per_byte") is not None else ""
        print(f"perplexity {name}: {r['ppl']:.4f} over {r['tokens']} tokens in {r['windows']} windows{bpb}", file=out)


def run(args) -> int:
    cfg = config_from_args(args)
    results = evaluate(cfg)
    print_table(results)
    if cfg.output:
        write_json_atomic(cfg.output, results)
        print(f"results written to {cfg.output}")
    return 0
