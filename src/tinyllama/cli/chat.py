"""`tinyllama chat --model DIR`: an interactive terminal chat in the TinyLlama-Chat format (tinyllama.chat)."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory, or a Hub id org/name[@revision]")
    p.add_argument("--random-preset", metavar="NAME", help="instead of --model, a randomly initialised preset (smoke test)")
    p.add_argument("--system", default="You are a friendly chatbot.", help="system prompt ('' for none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="CUDA only: fuse projections, compile the decode step into a CUDA graph")


def run(args) -> int:
    from tinyllama.chat import ChatSession, chat_loop
    from tinyllama.generate import DecodeEngine, SamplingConfig
    from tinyllama.loading import load_model_and_tokenizer

    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed)
    cfg.validate()
    model, tok = load_model_and_tokenizer(args.model, args.random_preset, args.device, args.dtype)
    session = ChatSession(model, tok, cfg, system=args.system, engine=DecodeEngine(model, compile=args.compile, fuse=args.compile))
    return chat_loop(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
