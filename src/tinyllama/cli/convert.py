"""`tinyllama convert --checkpoint DIR --out PATH [--to hf|gguf] [--quant f16|q8_0|q4_0] [--dtype ...]`.

DIR is a training checkpoint (a `step-XXXXXXX` directory written by `tinyllama pretrain`, on any number
of GPUs), a run directory (its latest checkpoint), or a Hugging Face directory. The output is a
Hugging Face directory (config.json + safetensors + tokenizer) or a GGUF file for llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

from tinyllama.errors import TinyLlamaError, pip_extra


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint dir (step-XXXXXXX), run dir (uses its latest), Hugging Face dir or Hub id")
    p.add_argument("--out", required=True, help="output Hugging Face directory, or .gguf file with --to gguf")
    p.add_argument("--to", choices=("hf", "gguf"), default="hf")
    p.add_argument("--quant", choices=("f16", "q8_0", "q4_0"), default="f16", help="GGUF tensor type")
    from tinyllama.cli._args import dtype

    p.add_argument("--dtype", type=dtype, default=None, help="weights dtype of the HF output: float32, bfloat16, float16 "
                                                 "(default: float32 for training checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out directory (its model files are replaced, other files kept) "
                        "or replace an existing .gguf file")


def run(args) -> int:
    from tinyllama.loading import load_checkpoint_or_hf

    out = Path(args.out)
    if args.to == "hf":
        from tinyllama.convert.hf import check_hf_target

        check_hf_target(out, args.overwrite)  # before the (possibly long) load
        model, tok, what = load_checkpoint_or_hf(args.checkpoint)
        model.save_pretrained(out, tokenizer=tok, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote Hugging Face model to {out} from {what}")
        return 0
    if args.dtype:
        raise TinyLlamaError("--dtype applies to --to hf; for GGUF choose --quant")
    try:
        from tinyllama.convert.gguf import check_gguf_target, export_gguf
    except ImportError as e:
        raise TinyLlamaError(f"GGUF export needs the gguf package: {pip_extra('gguf')} ({e})") from None
    check_gguf_target(out, args.overwrite)
    model, tok, what = load_checkpoint_or_hf(args.checkpoint)
    path = export_gguf(model, tok, out, args.quant, overwrite=args.overwrite)
    print(f"wrote GGUF ({args.quant}) to {path} from {what}")
    return 0
