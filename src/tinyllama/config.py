"""Model configuration: one dataclass with named presets, and the Hugging Face `config.json` form."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from tinyllama.checks import POSITIVE, check_fields
from tinyllama.errors import TinyLlamaError, json_error_text

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: dict[str, Any] | None, where: str) -> T:
    """Build any config dataclass from a mapping (a YAML section), naming unknown or bad fields.

    Every concern's config (model, optim, data, train, kernels, eval, serve) is built through this.
    """
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise TinyLlamaError(f"{where}: expected a mapping of fields, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TinyLlamaError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    try:
        return cls(**d)
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
        return dataclass_from_dict(cls, d, "model config")

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
        # CPU demo: big enough to learn real text in minutes on 2 cores (~19 M params, mostly embeddings).
        ModelConfig(
            name="tinyllama-demo", n_layers=4, hidden_size=256, n_heads=8, n_kv_heads=2, intermediate_size=704,
            max_seq_len=512,
        ),
        # Tests: tiny but still GQA (4 query heads share 2 key/value heads), ~4 M params.
        ModelConfig(
            name="tinyllama-tiny", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, intermediate_size=176,
            max_seq_len=256,
        ),
    ]
}
