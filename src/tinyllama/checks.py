"""Checks for values that come from users: flags, config files, request bodies.

NaN compares false with everything, so a test written as `if x < 0: raise` lets it through (and `inf`
passes `x > 0`); every rule here is stated as what the value must be, and NaN and ±inf fail all of them.
`tinyllama.cli._args` turns the same rules into argparse types.
"""

from __future__ import annotations

import math
from typing import Optional

from tinyllama.errors import TinyLlamaError


def number_rule(*, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> str:
    """How a rule reads in a message: 'an integer >= 1', 'a finite number in (0, 1]', 'a finite number'."""
    kind = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def number_problem(value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                   integer: bool = False) -> Optional[str]:
    """None when `value` keeps the rule, else the rule's wording (see number_rule)."""
    rule = dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, integer=integer)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return number_rule(**rule)
    if not integer and not math.isfinite(value):
        return number_rule(**rule)
    if lo is not None and not (value > lo if lo_open else value >= lo):
        return number_rule(**rule)
    if hi is not None and not (value < hi if hi_open else value <= hi):
        return number_rule(**rule)
    return None


def check_number(value, where: str, *, none_ok: bool = False, error: type = TinyLlamaError, **rule):
    """`value` if it keeps the rule (None too with none_ok), else `error`('{where} must be {rule}, got {value!r}')."""
    if value is None and none_ok:
        return value
    problem = number_problem(value, **rule)
    if problem:
        raise error(f"{where} must be {problem}{' or null' if none_ok else ''}, got {value!r}")
    return value


def check_fields(obj, where: str, *, error: type = TinyLlamaError, as_flags: bool = False, **rules: dict) -> None:
    """check_number on several fields of a config object: `rules` maps a field name to check_number's keywords
    (a rule below, maybe with none_ok=True); `where` is the message's start with {} for the name, which
    as_flags shows as flag and field ('--max-batch-size (max_batch_size)': set on the command line or in a file)."""
    for name, rule in rules.items():
        shown = f"--{name.replace('_', '-')} ({name})" if as_flags else name
        check_number(getattr(obj, name), where.format(shown), error=error, **rule)


# Rules, as keywords of check_number / number_problem / tinyllama.cli._args.number.
POSITIVE = dict(lo=0, lo_open=True)
NONNEGATIVE = dict(lo=0)
FRACTION = dict(lo=0, hi=1, hi_open=True)  # [0, 1)
PROBABILITY = dict(lo=0, hi=1)
POSITIVE_INT = dict(integer=True, lo=1)
NONNEGATIVE_INT = dict(integer=True, lo=0)
SEED = dict(integer=True, lo=-(2**63), hi=2**64 - 1)  # what torch.Generator.manual_seed takes


OFF_WORDS = ("", "none", "null", "false", "off")


def unless_off(value):
    """None when `value` turns a setting off (None, false, or a word in OFF_WORDS, any case), else `value`:
    `--train.export_hf none` must not mean a directory named 'none'."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in OFF_WORDS):
        return None
    return value


def device_problem(spec: str) -> Optional[str]:
    """None when `spec` names a usable device here (cpu, cuda, cuda:N with that GPU visible), else why not."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        return "not a device; use cpu, cuda or cuda:N"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"{dev.type} devices are not supported; use cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible (torch {torch.__version__}); use cpu"
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        return f"only {n} CUDA device(s) are visible (cuda:0 .. cuda:{n - 1})"
    return None


def check_device(spec: Optional[str], where: str = "--device") -> Optional[str]:
    """`spec` (None = the caller's default) if it is a usable device, else TinyLlamaError '{where} {spec}: why'."""
    if spec is None:
        return None
    problem = device_problem(str(spec))
    if problem:
        raise TinyLlamaError(f"{where} {spec}: {problem}")
    return spec
