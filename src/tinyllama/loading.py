"""Loading a model for use: from a Hugging Face directory, a training checkpoint or a random preset.

Every command that needs a model (generate, chat, serve, eval, convert, the lm-eval adapter) loads it
through these functions, so devices, dtypes, tokenizers and error messages are the same everywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from tinyllama.errors import TinyLlamaError

# What a model needs from a Hub repository (no *.bin / *.gguf / optimizer states).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
             "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, as the Hub spells repository ids


def resolve_model_path(name_or_dir, what: str = "model directory") -> Path:
    """A local path as it is; otherwise a Hugging Face Hub id `org/name` or `org/name@revision` -> the
    snapshot directory of that model in the Hub cache (`HF_HOME`, `HF_HUB_CACHE`), downloaded there first
    (config, safetensors and tokenizer files only) unless `HF_HUB_OFFLINE=1`. A local path of that name wins.
    Every command that takes a model (generate, chat, serve, eval, convert, sft/dpo, bench, the lm-eval
    adapter) resolves it here."""
    p = Path(name_or_dir)
    if p.exists():
        return p
    text = str(name_or_dir)
    repo_id, at, revision = text.partition("@")
    if not _HUB_ID.fullmatch(repo_id) or (at and not revision):
        raise TinyLlamaError(f"{p}: {what} not found")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    how = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}` (older huggingface_hub: " \
          f"`huggingface-cli download ...`)"
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES))
    except HFValidationError:
        raise TinyLlamaError(f"{p}: {what} not found") from None
    except RevisionNotFoundError:
        raise TinyLlamaError(f"{text}: the Hugging Face Hub model {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:
        raise TinyLlamaError(f"{text}: {repo_id} is gated on the Hugging Face Hub: accept its terms on its page, "
                             f"then log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise TinyLlamaError(f"{text}: no such {what}, and no model {repo_id} on the Hugging Face Hub (a private "
                             f"one needs `hf auth login`)") from None
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise TinyLlamaError(f"{text}: no such {what}, and the Hugging Face Hub model {repo_id} is not in the cache "
                             f"{constants.HF_HUB_CACHE} ({why}); download it with {how}, or give a local "
                             f"directory") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TinyLlamaError(f"{text}: downloading from the Hugging Face Hub failed ({type(e).__name__}: {first}); "
                             f"download it with {how}, or give a local directory") from None


def _tokenizer_of(model_dir: Path):
    """The model directory's own tokenizer if it has one, else the packaged Llama 2 tokenizer."""
    from tinyllama.tokenizer import Tokenizer

    has_tok = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return Tokenizer(model_dir) if has_tok else Tokenizer()


def load_model_and_tokenizer(model_dir, random_preset=None, device=None, dtype=None):
    from tinyllama.config import ModelConfig
    from tinyllama.convert import parse_dtype
    from tinyllama.model import Llama
    from tinyllama.tokenizer import Tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model_dir and random_preset:
        raise TinyLlamaError("give either --model or --random-preset, not both")
    if random_preset:
        torch.manual_seed(0)
        model = Llama(ModelConfig.from_name(random_preset)).to(device=device, dtype=dtype)
        tokenizer = Tokenizer()
    elif model_dir:
        model_dir = resolve_model_path(model_dir)
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
