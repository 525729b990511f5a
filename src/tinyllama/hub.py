"""Model names: a local directory, or a Hugging Face Hub id resolved through `huggingface_hub`'s cache.

Below everything that loads models (`convert.hf`, `loading`), so each of them can resolve names here.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def check_model_dir(name_or_dir, flag: str = "--model") -> Path:
    """What a `--model` flag names (a directory, or a Hub id resolved by `resolve_model_path`) if it can be a
    Hugging Face model directory; else one line on what it is instead (a file, a GGUF export, a training run
    or checkpoint) and how to make a Hugging Face directory from it."""
    p = resolve_model_path(name_or_dir)
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
