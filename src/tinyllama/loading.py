"""Loading a model for use: from a Hugging Face directory, a training checkpoint or a random preset.

Every command that needs a model (generate, chat, serve, eval, convert, the lm-eval adapter) loads it
through these functions, so devices, dtypes, tokenizers and error messages are the same everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tinyllama.checks import check_device
from tinyllama.errors import TinyLlamaError

from tinyllama.hub import check_model_dir, resolve_model_path  # noqa: F401  (re-exported)


def _tokenizer_of(model_dir: Path):
    """The model directory's own tokenizer if it has one, else the packaged Llama 2 tokenizer."""
    from tinyllama.tokenizer import Tokenizer

    has_tok = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return Tokenizer(model_dir) if has_tok else Tokenizer()


def inference_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device (`--device`, else CUDA when present, else CPU) and weight dtype (`--dtype`, else bf16 on
    CUDA and fp32 elsewhere: the weights themselves are cast, and pure-bf16 matmuls on a CPU are slow and
    less exact than fp32) that inference commands and benchmarks run in."""
    from tinyllama.convert import parse_dtype

    device = torch.device(check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model_and_tokenizer(model_dir, random_preset=None, device=None, dtype=None):
    from tinyllama.config import ModelConfig
    from tinyllama.model import Llama
    from tinyllama.tokenizer import Tokenizer

    device, dtype = inference_device_and_dtype(device, dtype)
    if model_dir and random_preset:
        raise TinyLlamaError("give either --model or --random-preset, not both")
    if random_preset:
        torch.manual_seed(0)
        model = Llama(ModelConfig.from_name(random_preset)).to(device=device, dtype=dtype)
        tokenizer = Tokenizer()
    elif model_dir:
        model_dir = check_model_dir(model_dir)
        model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
        tokenizer = _tokenizer_of(model_dir)
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

    p = resolve_model_path(path, what="checkpoint")
    if (p / "config.json").is_file():
        return Llama.from_pretrained(p), _tokenizer_of(p), f"Hugging Face directory {p}"
    from tinyllama.train.checkpoint import load_model_weights, read_meta, resolve_checkpoint, verify_checkpoint

    ckpt = resolve_checkpoint(p)
    note = verify_checkpoint(ckpt)  # a damaged checkpoint is refused, before meta.json is trusted
    if note:
        print(f"note: {note}", file=sys.stderr)
    meta = read_meta(ckpt)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise TinyLlamaError(f"{ckpt / 'meta.json'}: no usable 'model' entry ({e})") from None
    model = Llama(config)
    load_model_weights(ckpt, model, verify=False)
    return model.eval(), Tokenizer(), f"training checkpoint {ckpt} (step {meta.get('step')})"


def load_gguf_model(path):
    """A tinyllama `Llama` with the (dequantized) weights of a GGUF file, in fp32."""
    from tinyllama.convert.gguf import read_gguf
    from tinyllama.model import Llama

    config, state, _ = read_gguf(path)
    model = Llama(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TinyLlamaError(f"{path}: GGUF tensors do not match its metadata (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
