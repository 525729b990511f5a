"""`tinyllama chat --model DIR`: an interactive terminal chat in the TinyLlama-Chat format (tinyllama.chat)."""

from __future__ import annotations

import sys

from tinyllama.cli._args import add_device_arguments, add_sampling_arguments, sampling_from_args

def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory, or a Hub id org/name[@revision]")
    p.add_argument("--random-preset", metavar="NAME", help="instead of --model, a randomly initialised preset (smoke test)")
    p.add_argument("--system", default="You are a friendly chatbot.", help="system prompt ('' for none)")
    add_sampling_arguments(p, max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.95)
    add_device_arguments(p)
    p.add_argument("--compile", action="store_true", help="CUDA only: fuse projections, compile the decode step into a CUDA graph")


def run(args) -> int:
    from tinyllama.chat import ChatSession, chat_loop
    from tinyllama.generate import DecodeEngine
    from tinyllama.loading import load_model_and_tokenizer

    cfg = sampling_from_args(args)
    model, tok = load_model_and_tokenizer(args.model, args.random_preset, args.device, args.dtype)
    session = ChatSession(model, tok, cfg, system=args.system, engine=DecodeEngine(model, compile=args.compile, fuse=args.compile))
    return chat_loop(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
