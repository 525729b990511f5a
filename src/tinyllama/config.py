"""Configuration: the one loader every command uses (YAML + `--section.field value` overrides, typed and
checked), and the model's configuration (one dataclass with named presets, and the Hugging Face
`config.json` form)."""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional, TypeVar

from tinyllama.checks import POSITIVE, check_fields
from tinyllama.errors import TinyLlamaError, json_error_text

T = TypeVar("T")


# ---- the one config loader ---------------------------------------------------------------------------
# Every command's configuration is a dataclass (sections of a run are dataclass-typed fields); it is read
# from YAML, overridden from the command line (`--section.field value`) and built here, with values coerced
# to the fields' types and unknown or mistyped fields named in one line.
def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from YAML or the command line) as the field type `hint`, or a one-line error."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if value is False and type(None) in args and bool not in args:
            return None  # `false` turns an optional setting off (--train.export_hf false)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except TinyLlamaError as e:
                errors.append(e)
        raise errors[0]
    if hint is Any or hint is object:
        return value
    if is_dataclass(hint) and isinstance(hint, type):
        return value if isinstance(value, hint) else build_config(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise TinyLlamaError(f"{where}: expected true or false, got {value!r}")
    if hint is int or hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value) if hint is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise TinyLlamaError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TinyLlamaError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise TinyLlamaError(f"{where}: expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TinyLlamaError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TinyLlamaError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if args and args[-1] is not Ellipsis and len(args) > 1 and len(args) != len(value):
            raise TinyLlamaError(f"{where}: expected {len(args)} values, got {value!r}")
        items = [_coerce(v, args[min(i, len(args) - 1)] if args and args[-1] is not Ellipsis else
                        (args[0] if args else Any), f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TinyLlamaError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build_config(cls: type[T], raw: dict[str, Any] | None, where: str) -> T:
    """A config dataclass from a mapping (a YAML file or section): nested sections built recursively,
    values coerced to the field types, unknown fields named. A section given as null keeps its defaults.

    A class may name its sections (`config_sections`, for "unknown section" messages) and choose a
    field's class from its raw value (`config_field_class(name, raw) -> class or None`).
    """
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise TinyLlamaError(f"{where}: expected a mapping of fields, got {type(raw).__name__} {raw!r}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(raw) - known)
    sections = getattr(cls, "config_sections", None)
    if unknown and sections:
        raise TinyLlamaError(f"{where}: unknown section(s) {unknown}; sections are {', '.join(sections)}")
    if unknown:
        raise TinyLlamaError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    choose = getattr(cls, "config_field_class", None)
    kwargs = {}
    for name, value in raw.items():
        hint = (choose(name, value) if choose else None) or hints.get(name, Any)
        label = f"{where}: section '{name}'" if sections and name in sections else f"{where}: field '{name}'"
        if value is None and typing.get_origin(hint) not in (typing.Union, types.UnionType) and hint is not Any:
            continue  # `section:` left empty: its defaults
        kwargs[name] = _coerce(value, hint, label)
    try:
        return cls(**kwargs)
    except TinyLlamaError:
        raise
    except (TypeError, ValueError) as e:
        raise TinyLlamaError(f"{where}: {e}") from None


def read_yaml_mapping(path: str | os.PathLike, expected: str = "a mapping of fields") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; an empty file is an empty mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TinyLlamaError(f"{path}: config file not found")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TinyLlamaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise TinyLlamaError(f"{path}: expected {expected}")
    return d


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['--optim.lr', '3e-4', '--train.compile=true'] -> {'optim.lr': 3e-4, 'train.compile': True}."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise TinyLlamaError(f"unrecognised argument '{tok}': overrides look like --section.field value (e.g. --optim.lr 3e-4)")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise TinyLlamaError(f"override '{tok}' has no value")
            key, raw = tok[2:], items[i + 1]
            i += 2
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            val = raw
        out[key] = val
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any], sections: Optional[typing.Sequence[str]] = None) -> dict:
    """Set each dotted key ('optim.lr', 'model.n_layers') in a copy of `raw`, creating sections as needed."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, val in overrides.items():
        parts = key.split(".")
        if sections is not None and parts[0] not in sections:
            raise TinyLlamaError(f"override '--{key}': unknown section '{parts[0]}'; sections are {', '.join(sections)}")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            elif not isinstance(node[p], dict):
                raise TinyLlamaError(f"override '--{key}': '{p}' is not a section")
            else:
                node[p] = dict(node[p])
            node = node[p]
        node[parts[-1]] = val
    return raw


def load_config(cls: type[T], path: Optional[str | os.PathLike] = None, overrides: list[str] | dict | None = None,
                *, base: dict | typing.Callable[[dict], dict] | None = None, source: Optional[str] = None) -> T:
    """The one loader every command uses: the YAML file at `path` with `overrides` on top
    (`['--train.max_steps', '5']` from the command line, or {'train.max_steps': 5}), over `base`, the
    command's own defaults (a mapping, or a function of what the user gave); then built and type-checked
    by `build_config`."""
    sections = getattr(cls, "config_sections", None)
    user = read_yaml_mapping(path, "a mapping of " + ("sections " + "/".join(sections) if sections else "fields")) \
        if path is not None else {}
    flat = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    user = apply_overrides(user, flat, sections)
    raw = apply_overrides(base(user) if callable(base) else (base or {}), {})
    for k, v in user.items():
        raw[k] = {**raw[k], **v} if isinstance(raw.get(k), dict) and isinstance(v, dict) else v
    return build_config(cls, raw, source or (str(path) if path is not None else "config"))


def config_from_args(cls: type[T], args: Any) -> T:
    """`cls` from a command's `--config FILE` plus the flags named like its fields (those given win)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return load_config(cls, getattr(args, "config", None), given)

@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-2-style decoder. Field names follow what they are, not a framework."""

    name: str = "custom"
    vocab_size: int = 32000
    n_layers: int = 22
    hidden_size: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 4
    intermediate_size: int = 5632
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def validate(self) -> None:
        for f in ("vocab_size", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TinyLlamaError(f"model config: field '{f}' must be a positive integer, got {v!r}")
        if self.hidden_size % self.n_heads:
            raise TinyLlamaError(
                f"model config: field 'hidden_size' ({self.hidden_size}) must be divisible by 'n_heads' ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise TinyLlamaError(
                f"model config: field 'n_heads' ({self.n_heads}) must be divisible by 'n_kv_heads' ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise TinyLlamaError(f"model config: head dim hidden_size/n_heads = {self.head_dim} must be even for rotary embeddings")
        check_fields(self, "model config: field '{}'", norm_eps=POSITIVE, rope_theta=POSITIVE)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise TinyLlamaError(f"unknown model preset '{name}'; choose one of: {', '.join(sorted(PRESETS))}")
        cfg = replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
        return cfg

    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return build_config(cls, d, "model config")

    # ---- parameter counting (exact, matches the module) ---------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.n_heads * d + 2 * h * self.n_kv_heads * d + self.n_heads * d * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        total = self.n_layers * per_layer + h + (emb if include_embeddings else 0)
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·layers·hidden·seq (PaLM appendix B convention).

        N_matmul counts every weight used in a matrix product: all parameters except the input
        embedding table (a lookup) and the norms, with the output head included (7.3 GFLOP for 1.1B at 2048).
        """
        seq = seq_len or self.max_seq_len
        h = self.hidden_size
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * h - (2 * self.n_layers + 1) * h
        return 6 * matmul_params + 12 * self.n_layers * h * seq

    # ---- Hugging Face config.json -----------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in ("llama", None):
            raise TinyLlamaError(f"{source}: model_type is '{mt}', but only Llama checkpoints ('llama') are supported")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        for key in required:
            if key not in d:
                raise TinyLlamaError(f"{source}: missing field '{key}' (is this a Hugging Face Llama config.json?)")
        if d.get("hidden_act", "silu") != "silu":
            raise TinyLlamaError(f"{source}: field 'hidden_act' is '{d['hidden_act']}', only 'silu' (SwiGLU) is supported")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise TinyLlamaError(f"{source}: field '{key}' is true, but Llama-2 models have no biases")
        rs = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rp = d.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if isinstance(rp, dict):
            if rp.get("rope_type", "default") not in ("default", None):
                raise TinyLlamaError(f"{source}: rope type '{rp.get('rope_type')}' is not supported (only default RoPE)")
            rope_theta = rp.get("rope_theta", rope_theta)
        if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
            raise TinyLlamaError(f"{source}: field 'rope_scaling' = {rs!r} is not supported (only default RoPE)")
        n_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim")
        if head_dim is not None and n_heads * head_dim != hidden:
            raise TinyLlamaError(
                f"{source}: field 'head_dim' ({head_dim}) × num_attention_heads ({n_heads}) must equal hidden_size ({hidden})"
            )
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            name=d.get("_name_or_path") or "hf",
            vocab_size=d["vocab_size"],
            n_layers=d["num_hidden_layers"],
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            intermediate_size=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_id=d.get("bos_token_id", 1) if d.get("bos_token_id") is not None else 1,
            eos_id=eos if eos is not None else 2,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise TinyLlamaError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TinyLlamaError(f"{path}: not valid JSON ({json_error_text(e)})") from None
        if not isinstance(d, dict):
            raise TinyLlamaError(f"{path}: expected a JSON object")
        if "num_hidden_layers" in d or "model_type" in d:
            return cls.from_hf_dict(d, source=str(path))
        return cls.from_dict(d)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # TinyLlama-1.1B: exactly 1,100,048,384 parameters.
        ModelConfig(name="tinyllama-1.1b"),
        ModelConfig(
            name="tinyllama-120m", n_layers=12, hidden_size=768, n_heads=12, n_kv_heads=1, intermediate_size=2048
        ),
        # CPU demo: learns real text in minutes on 2 cores (~7.7 M params, mostly the tied embedding table).
        ModelConfig(
            name="tinyllama-demo", n_layers=4, hidden_size=192, n_heads=6, n_kv_heads=2, intermediate_size=512,
            max_seq_len=512, tie_embeddings=True,
        ),
        # Tests: tiny but still GQA (4 query heads share 2 key/value heads), ~4 M params.
        ModelConfig(
            name="tinyllama-tiny", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, intermediate_size=176,
            max_seq_len=256,
        ),
    ]
}
