"""argparse types shared by the subcommands: numbers that reject NaN, ±inf and out-of-range values, devices
and dtypes, each failing at parse time as one line naming the flag (`error: argument --top-p: ...`).

The rules are tinyllama.checks'; config files and library callers get the same checks from the
config dataclasses' validate() methods.
"""

from __future__ import annotations

import argparse

from tinyllama.checks import (
    NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, SEED, device_problem, number_problem,
    number_rule,
)


def number(*, integer: bool = False, **rule):
    """An argparse type: int or float text that keeps the rule (see tinyllama.checks.number_rule)."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {number_rule(integer=integer, **rule)}, got {text!r}") from None
        problem = number_problem(value, integer=integer, **rule)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {problem}, got {text!r}")
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def number_list(*, integer: bool = True, **rule):
    """An argparse type for comma-separated numbers ('1,8,32'), each keeping the rule; gives a list."""
    one = number(integer=integer, **rule)

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [one(t) for t in items]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"each item {e} in {text!r}") from None

    parse.__name__ = "list"
    return parse


finite_float = number()
positive_float = number(**POSITIVE)
nonnegative_float = number(**NONNEGATIVE)
probability = number(**PROBABILITY)
positive_int = number(**POSITIVE_INT)
nonnegative_int = number(**NONNEGATIVE_INT)
seed = number(**SEED)


def device(text: str) -> str:
    """--device: cpu, cuda or cuda:N, and that device must be visible on this machine."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def dtype(text: str) -> str:
    """--dtype: a name tinyllama.convert knows (float32, bfloat16, float16 or their short forms)."""
    from tinyllama.convert.hf import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; choose one of {', '.join(DTYPES)}")
    return text


def add_device_arguments(p) -> None:
    """--device and --dtype of the commands that load a model."""
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", type=dtype, default=None,
                   help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")


def add_sampling_arguments(p, *, max_new_tokens: int, temperature: float, top_k=None, top_p=None) -> None:
    """The sampling flags of `generate` and `chat` (their defaults differ)."""
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=max_new_tokens, help="longest output, in tokens")
    p.add_argument("--temperature", type=nonnegative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=top_k)
    p.add_argument("--top-p", type=number(**POSITIVE, hi=1), default=top_p)
    p.add_argument("--min-p", type=probability, default=None)
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="> 1 discourages repeats (CTRL rule)")
    p.add_argument("--seed", type=seed, default=None)


def sampling_from_args(args, **extra):
    from tinyllama.generate import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed, **extra)
    cfg.validate()
    return cfg
