"""`tinyllama generate`: stream a continuation of a prompt to the terminal."""

from __future__ import annotations

import sys

from tinyllama.errors import TinyLlamaError


def add_arguments(p) -> None:
    p.add_argument("--model", help="Hugging Face model directory, or a Hub id org/name[@revision]")
    p.add_argument("--random-preset", metavar="NAME",
                   help="instead of --model, use a randomly initialised preset (e.g. tinyllama-tiny): a smoke test")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL rule)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA only: fuse projections, run decode steps as CUDA graphs (batch 1: the Triton "
                        "decode kernels) and capture the prefill; the first call compiles")


def run(args) -> int:
    from tinyllama.generate import DecodeEngine, SamplingConfig, stream_text
    from tinyllama.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, args.random_preset, args.device, args.dtype)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                         stop=tuple(args.stop), seed=args.seed)
    cfg.validate()
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
