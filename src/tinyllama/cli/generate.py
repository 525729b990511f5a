"""`tinyllama generate`: stream a continuation of a prompt to the terminal."""

from __future__ import annotations

import sys

from tinyllama.cli._args import add_device_arguments, add_sampling_arguments, sampling_from_args
from tinyllama.errors import TinyLlamaError


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory, or a Hub id org/name[@revision]")
    p.add_argument("--random-preset", metavar="NAME",
                   help="instead of --model, use a randomly initialised preset (e.g. tinyllama-tiny): a smoke test")
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_arguments(p, max_new_tokens=128, temperature=0.8)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    add_device_arguments(p)
    p.add_argument("--compile", action="store_true",
                   help="CUDA only: fuse projections, run decode steps as CUDA graphs (batch 1: the Triton "
                        "decode kernels) and capture the prefill; the first call compiles")


def run(args) -> int:
    from tinyllama.generate import DecodeEngine, stream_text
    from tinyllama.loading import load_model_and_tokenizer

    cfg = sampling_from_args(args, stop=tuple(args.stop))
    model, tok = load_model_and_tokenizer(args.model, args.random_preset, args.device, args.dtype)
    prompt_ids = tok.encode(args.prompt, bos=True)
    if len(prompt_ids) >= model.config.max_seq_len:
        raise TinyLlamaError(f"--prompt is {len(prompt_ids)} tokens, the model's context is {model.config.max_seq_len}")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    engine = DecodeEngine(model, compile=True, fuse=True) if args.compile else None
    for piece in stream_text(model, tok, prompt_ids, cfg, engine=engine):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
