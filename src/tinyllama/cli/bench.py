"""`tinyllama bench {train,generate,data}`: each benchmark is a module with add_arguments(p) and run(args)."""

from __future__ import annotations

import importlib

BENCHES = {
    "train": ("tinyllama.bench.train", "training step throughput vs the transformers baseline"),
    "generate": ("tinyllama.bench.generate", "decode speed vs transformers generate"),
    "quantize": ("tinyllama.bench.quantize", "int8/int4 weight-only quantization: perplexity change and speed"),
    "data": ("tinyllama.bench.data", "prepare tokens/s and loader blocks/s"),
    "gguf": ("tinyllama.bench.gguf", "GGUF export round trip through llama.cpp (llama-cpp-python)"),
    "eval": ("tinyllama.bench.eval", "multiple-choice scoring speed vs lm-evaluation-harness's hf backend"),
    "serve": ("tinyllama.bench.serve", "OpenAI server load test: requests/s and tokens/s under concurrency"),
}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        sp = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(sp)


def run(args) -> int:
    return int(importlib.import_module(BENCHES[args.bench][0]).run(args) or 0)
