"""`tinyllama dpo --model SFT_DIR --data prefs.jsonl [--beta 0.1] [--lora] [--out DIR] [--resume]`.

Direct preference optimisation against a frozen reference (the starting model, or --reference DIR), as
TinyLlama-Chat-v1.0 was made from its SFT model on UltraFeedback.
"""

from __future__ import annotations

ACCEPTS_OVERRIDES = True


def add_arguments(p) -> None:
    from tinyllama.cli._finetune import add_common_arguments

    add_common_arguments(p, "dpo")
    p.add_argument("--beta", type=float, help="dpo.beta: strength of the pull towards the reference (default 0.1)")
    p.add_argument("--reference", help="model.reference: reference model directory (default: --model)")


def run(args) -> int:
    from tinyllama.cli._finetune import run_common

    return run_common(args, "dpo", {"dpo.beta": args.beta, "model.reference": args.reference})
