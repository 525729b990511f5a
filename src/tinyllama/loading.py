"""Loading a model for use: from a Hugging Face directory, a training checkpoint or a random preset.

Every command that needs a model (generate, chat, serve, eval, convert, the lm-eval adapter) loads it
through these functions, so devices, dtypes, tokenizers and error messages are the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinyllama.checks import check_device
from tinyllama.errors import TinyLlamaError


def check_model_dir(path, flag: str = "--model") -> Path:
    """`path` if it can be a Hugging Face model directory; else one line on what it is instead (a file, a
    GGUF export, a training run or checkpoint) and how to make a Hugging Face directory from it."""
    p = Path(path)
    if not p.exists():
        raise TinyLlamaError(f"{p}: model directory not found")
    if not p.is_dir():
        what = "a GGUF file (for llama.cpp)" if p.suffix.lower() == ".gguf" else "a file"
        raise TinyLlamaError(
            f"{flag} {p}: {what}; {flag} takes a Hugging Face model directory (config.json + *.safetensors), "
            "which `tinyllama convert --checkpoint RUN_OR_CHECKPOINT --out DIR` writes"
        )
    if not (p / "config.json").is_file() and any((p / f).exists() for f in ("meta.json", "checkpoints", "latest")):
        raise TinyLlamaError(
            f"{flag} {p}: a training run or checkpoint; {flag} takes a Hugging Face model directory, "
            f"which `tinyllama convert --checkpoint {p} --out DIR` writes"
        )
    return p


def load_model_and_tokenizer(model_dir, random_preset=None, device=None, dtype=None):
    from tinyllama.config import ModelConfig
    from tinyllama.convert import parse_dtype
    from tinyllama.model import Llama
    from tinyllama.tokenizer import Tokenizer

    device = torch.device(check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model_dir and random_preset:
        raise TinyLlamaError("give either --model or --random-preset, not both")
    if random_preset:
        torch.manual_seed(0)
        model = Llama(ModelConfig.from_name(random_preset)).to(device=device, dtype=dtype)
        tokenizer = Tokenizer()
    elif model_dir:
        model = Llama.from_pretrained(check_model_dir(model_dir), dtype=dtype, device=device)
        has_tok = any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = Tokenizer(model_dir) if has_tok else Tokenizer()
    else:
        raise TinyLlamaError("missing --model DIR (a Hugging Face model directory) or --random-preset NAME")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TinyLlamaError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model.eval(), tokenizer


def load_checkpoint_or_hf(path: str):
    """(model, tokenizer, description) from a training checkpoint, run directory or HF directory."""
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama
    from tinyllama.tokenizer import Tokenizer

    p = Path(path)
    if not p.exists():
        raise TinyLlamaError(f"{p}: checkpoint not found")
    if (p / "config.json").is_file():
        model = Llama.from_pretrained(p)
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        return model, (Tokenizer(p) if has_tok else Tokenizer()), f"Hugging Face directory {p}"
    from tinyllama.train.checkpoint import load_model_weights, read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(p)
    meta = read_meta(ckpt)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise TinyLlamaError(f"{ckpt / 'meta.json'}: no usable 'model' entry ({e})") from None
    model = Llama(config)
    load_model_weights(ckpt, model)
    return model.eval(), Tokenizer(), f"training checkpoint {ckpt} (step {meta.get('step')})"
