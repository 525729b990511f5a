"""`tinyllama sft --model DIR --data chat.jsonl [--lora [--quantize int4]] [--out DIR] [--resume]`.

Supervised fine-tuning on chat conversations with the model's chat template, loss on assistant tokens
only, packed blocks; checkpoints resume exactly; the result is exported as a Hugging Face directory.
"""

from __future__ import annotations

ACCEPTS_OVERRIDES = True


def add_arguments(p) -> None:
    from tinyllama.cli._finetune import add_common_arguments

    add_common_arguments(p, "sft")


def run(args) -> int:
    from tinyllama.cli._finetune import run_common

    return run_common(args, "sft")
