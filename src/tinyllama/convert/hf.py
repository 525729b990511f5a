"""Hugging Face checkpoints both ways: a state-dict adapter plus safetensors I/O.

Our parameter names are Hugging Face's `LlamaForCausalLM` names without the `model.` prefix of the
decoder stack, so the adapter only renames. Files are written to a temporary directory and renamed
into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError, fused_projections_error

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TinyLlamaError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- state-dict adapter -------------------------------------------------------------------------
def to_hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


def from_hf_key(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {to_hf_key(k): v for k, v in state_dict.items()}
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig, source: str = "checkpoint") -> dict:
    sd = {from_hf_key(k): v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings and "lm_head.weight" not in sd and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd


# ---- loading ------------------------------------------------------------------------------------
def _safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TinyLlamaError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (directory / f).is_file():
                raise TinyLlamaError(f"{directory / f}: shard listed in {index.name} is missing")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if (directory / "pytorch_model.bin").is_file():
        raise TinyLlamaError(f"{directory}: only pytorch_model.bin found; re-save it as safetensors (safe_serialization=True)")
    raise TinyLlamaError(f"{directory}: no model.safetensors or model.safetensors.index.json found")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    if size < 8:
        raise TinyLlamaError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-export it")
    # Check the header's promised length against the file size before reading: a clear message for truncation.
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise TinyLlamaError(f"{path}: truncated safetensors file (header says {header_len} bytes, file has {size}); re-download or re-export it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TinyLlamaError(f"{path}: corrupt safetensors header; re-download or re-export it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise TinyLlamaError(
            f"{path}: truncated safetensors file (needs {8 + header_len + end} bytes, has {size}); re-download or re-export it"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise TinyLlamaError(f"{path}: cannot read safetensors ({e})") from None


def read_hf_checkpoint(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face Llama directory (config.json + safetensors, single or sharded) -> (config, our state
    dict). `Llama.from_pretrained` builds the model from it; this module never imports the model."""
    from tinyllama.hub import resolve_model_path

    directory = resolve_model_path(path)  # a Hub id `org/name` too
    if not directory.exists():
        raise TinyLlamaError(f"{directory}: model directory not found")
    if not directory.is_dir():
        raise TinyLlamaError(f"{directory}: expected a model directory (config.json + *.safetensors), got a file")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise TinyLlamaError(f"{directory}: no config.json; is this a Hugging Face model directory?")
    config = ModelConfig.from_json(cfg_path)
    hf_sd: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(directory):
        hf_sd.update(read_safetensors(f))
    return config, from_hf_state_dict(hf_sd, config, source=str(directory))


def check_state_dict(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source) -> None:
    """The checkpoint's tensors are exactly the model's, with the model's shapes; else one line naming one."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {to_hf_key(missing[0])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {to_hf_key(unexpected[0])}")
        raise TinyLlamaError(f"{source}: weights do not match config.json ({'; '.join(parts)}): not a Llama checkpoint of this architecture")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise TinyLlamaError(
                f"{source}: tensor {to_hf_key(k)} has shape {tuple(sd[k].shape)} but config.json implies {tuple(v.shape)}"
            )


def refuse_fused(state: dict, purpose: str) -> None:
    """Exports need separate q/k/v and gate/up weights (`Llama.fuse_projections` is inference only)."""
    if any(k.endswith(("qkv_proj.weight", "gate_up_proj.weight")) for k in state):
        raise fused_projections_error(purpose)


# ---- saving -------------------------------------------------------------------------------------
def _shard(state: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


# What an export writes (and a re-export into the same directory replaces). Weights are matched by
# pattern so a sharded export replacing a single-file one (or the reverse) leaves no stale weights behind.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_STAGING_PREFIX = ".tinyllama-export-"


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or bool(_SHARD_RE.match(name))


def check_hf_target(target, overwrite: bool) -> None:
    """Refuse, before any work: a path that is not a directory; a non-empty directory unless `overwrite`."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise TinyLlamaError(f"{target}: exists and is not a directory; a Hugging Face model is a directory: "
                             f"choose another --out")
    if target.is_dir() and not overwrite:
        present = sorted(p.name for p in target.iterdir())
        if present:
            raise TinyLlamaError(
                f"{target}: directory is not empty ({len(present)} entries, e.g. {present[0]}); pass --overwrite to "
                f"replace the model files in it (other files are kept), or choose another --out"
            )


def _merge_into(staging: Path, target: Path) -> None:
    """Move the files of `staging` into the existing directory `target`, replacing its model files only.

    config.json is removed first and put back last: while it is absent the directory is no loadable model,
    so a crash part-way leaves either the old model, no model, or the new one, never a mix of the two.
    """
    new = {p.name for p in staging.iterdir()}
    try:
        (target / "config.json").unlink(missing_ok=True)
        for old in target.iterdir():
            if _is_model_file(old.name) and old.name not in new and old.is_file():
                old.unlink()
        for name in sorted(new - {"config.json"}) + ["config.json"]:
            os.replace(staging / name, target / name)
    except OSError as e:
        raise TinyLlamaError(f"{target}: cannot replace the model files in it ({e})") from None
    staging.rmdir()


def save_hf_model(model, path, tokenizer=None, dtype=None, max_shard_size: int = 2 * 1024**3,
                  overwrite: bool = True) -> Path:
    """Write config.json, (sharded) safetensors, generation_config.json and tokenizer files.

    A new directory appears whole (written under a temporary name, then renamed). Into an existing
    directory (non-empty ones only with `overwrite`, as `tinyllama convert --overwrite`; the training
    exports re-run into their own directory, so they pass True) the model files are replaced and every
    other file is kept (see `_merge_into`). Files and folders get the umask's modes.
    """
    from safetensors.torch import save_file

    from tinyllama.fileio import publish_modes
    from tinyllama.tokenizer import Tokenizer

    config: ModelConfig = model.config
    state = model.state_dict()
    refuse_fused(state, "saving a Hugging Face checkpoint")
    target = Path(path)
    check_hf_target(target, overwrite)
    dtype = parse_dtype(dtype)
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(state, config).items()}
    saved_dtype = next(iter(hf_state.values())).dtype

    merge = target.is_dir()
    if merge:
        for stale in target.glob(_STAGING_PREFIX + "*"):  # left by a crashed export
            shutil.rmtree(stale, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    # Staged inside an existing target (known writable, same file system), else next to it.
    tmp = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX if merge else f".{target.name}.tmp-",
                                dir=target if merge else target.parent))
    try:
        hf_cfg = config.to_hf_dict()
        hf_cfg["torch_dtype"] = str(saved_dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id, "max_length": config.max_seq_len,
               "pad_token_id": 0, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shards = _shard(hf_state, max_shard_size)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                for k, v in shard.items():
                    weight_map[k] = name
                    total += v.numel() * v.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tokenizer or Tokenizer()).save_pretrained(tmp)
        publish_modes(tmp)
        if merge:
            _merge_into(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
