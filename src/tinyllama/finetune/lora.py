"""LoRA: low-rank adapters on a frozen base, including a weight-only quantized (int8/int4) base (QLoRA-style).

`apply_lora` wraps the targeted projections: y = base(x) + (alpha / r) · B(A(dropout(x))), with A random
(Kaiming, as PEFT) and B zero so training starts from the base model exactly. The base can be any module
computing x @ W^T: nn.Linear or tinyllama.quantize's Int8Linear/Int4Linear. `merge_lora` folds B·A into
the base weight (dequantizing a quantized base) and gives back plain nn.Linear layers, ready for
`Llama.save_pretrained`. `save_adapter` writes a PEFT-layout adapter (adapter_config.json +
adapter_model.safetensors) that `peft` can load onto the Hugging Face base.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from tinyllama.checks import FRACTION, POSITIVE, POSITIVE_INT, check_fields
from tinyllama.errors import TinyLlamaError
from tinyllama.fileio import atomic_file

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    quantize: Optional[str] = None  # None, "int8" or "int4": the frozen base's weight format while training
    group_size: int = 128  # int4 group size

    def validate(self) -> None:
        check_fields(self, "lora config: field '{}'", r=POSITIVE_INT, alpha=POSITIVE, dropout=FRACTION,
                     group_size=POSITIVE_INT)
        bad = sorted(set(self.targets) - set(ALL_TARGETS) - {"lm_head"})
        if bad or not self.targets:
            raise TinyLlamaError(f"lora config: field 'targets' has unknown {bad or 'nothing'}; choose from {ALL_TARGETS}")
        if self.quantize not in (None, "int8", "int4"):
            raise TinyLlamaError(f"lora config: field 'quantize' must be int8, int4 or null, got {self.quantize!r}")
        if self.quantize and not self.enabled:
            raise TinyLlamaError("lora config: 'quantize' freezes the base in a quantized format: it needs lora.enabled true")


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's (out, in) weight as a float tensor, dequantizing if needed."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = base(x) with the fused quantized kernel; dx = dy @ dequant(W). The weight never gets a gradient,
    and PyTorch's int4/int8 weight-only kernels have no derivative of their own."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.base.dequantize().to(grad_y.dtype)
        return grad_y @ w, None


def frozen_base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(base, "dequantize") and torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantizedMatmul.apply(x, base)
    return base(x)


class FrozenQuantizedLinear(nn.Module):
    """A quantized layer without an adapter, made differentiable w.r.t. its input (so adapters below it train)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def dequantize(self) -> torch.Tensor:
        return self.base.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_base_forward(self.base, x)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        in_f = getattr(base, "in_features", None)
        out_f = getattr(base, "out_features", None)
        if in_f is None or out_f is None:
            raise TinyLlamaError(f"LoRA: cannot wrap {type(base).__name__}: it has no in_features/out_features")
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        ref = next(iter(list(base.parameters()) + list(base.buffers())))
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        # Adapters train in fp32 whatever the base's dtype (a bf16 or int4 base still gets fp32 updates).
        self.lora_A = nn.Linear(in_f, r, bias=False, device=ref.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=ref.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        self._compute_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_base_forward(self.base, x)
        if not self.adapters_enabled:
            return y
        a = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return y + (a * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = ALL_TARGETS) -> list[str]:
    """Freeze every parameter and wrap the targeted layers (matched by name suffix). Returns wrapped names."""
    from tinyllama.model import ensure_unfused

    ensure_unfused(model, "LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if any(n == t or n.endswith("." + t) for t in targets) and not isinstance(m, LoRALinear)
             and hasattr(m, "in_features")]
    if not names:
        raise TinyLlamaError(f"LoRA: no layer matches targets {list(targets)}")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    # Quantized layers left without an adapter still have to pass gradients to the layers below.
    for n, m in list(model.named_modules()):
        if hasattr(m, "dequantize") and hasattr(m, "in_features") and not isinstance(m, FrozenQuantizedLinear) \
                and not n.endswith(".base") and n not in names:
            _set(model, n, FrozenQuantizedLinear(m))
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield n, m


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the frozen base alone (DPO's reference model without a second copy of the weights)."""
    layers = [m for _, m in lora_layers(model)]
    old = [m.adapters_enabled for m in layers]
    for m in layers:
        m.adapters_enabled = False
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            m.adapters_enabled = o


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: Optional[torch.dtype] = None, dequantize_rest: bool = True) -> nn.Module:
    """Fold every adapter into its base weight and replace the wrapper with a plain nn.Linear.

    A quantized base is dequantized first (merged = dequant(W) + B·A). With dequantize_rest, quantized
    layers without adapters also become nn.Linear, so the model exports to Hugging Face format.
    """
    for n, m in list(lora_layers(model)):
        w = _base_weight(m.base).float() + m.delta_weight().float()
        out_dtype = dtype or (m._compute_dtype if m._compute_dtype.is_floating_point else torch.float32)
        lin = nn.Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=out_dtype)
        lin.weight.copy_(w.to(out_dtype))
        _set(model, n, lin)
    if dequantize_rest:
        for n, mod in list(model.named_modules()):
            if hasattr(mod, "dequantize") and not isinstance(mod, nn.Linear) and hasattr(mod, "in_features") \
                    and not n.endswith(".base"):
                w = mod.dequantize()
                lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device=w.device,
                                dtype=dtype or w.dtype)
                lin.weight.copy_(w.to(lin.weight.dtype))
                _set(model, n, lin)
    tie = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tie:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- adapter files (PEFT layout) -----------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT names: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (lm_head without `model.`)."""
    out = {}
    for n, m in lora_layers(model):
        hf = n if n.startswith("lm_head") else "model." + n
        out[f"base_model.model.{hf}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"base_model.model.{hf}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, directory, cfg: LoRAConfig, base_model_path: Optional[str] = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = list(lora_layers(model))
    if not layers:
        raise TinyLlamaError("save_adapter: the model has no LoRA layers")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model_path}
    for name, write in (("adapter_model.safetensors", lambda p: save_file(adapter_state_dict(model), p)),
                        ("adapter_config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))):
        with atomic_file(directory / name) as tmp:
            write(str(tmp))
    return directory


def load_adapter(model: nn.Module, directory) -> None:
    """Load adapter weights written by `save_adapter` into a model already wrapped by `apply_lora`."""
    from tinyllama.convert import read_safetensors

    f = Path(directory) / "adapter_model.safetensors"
    if not f.is_file():
        raise TinyLlamaError(f"{directory}: no adapter_model.safetensors")
    sd = read_safetensors(f)
    want = adapter_state_dict(model)
    missing = sorted(set(want) - set(sd))
    if missing:
        raise TinyLlamaError(f"{f}: missing {len(missing)} adapter tensor(s), e.g. {missing[0]}")
    with torch.no_grad():
        for n, m in lora_layers(model):
            hf = n if n.startswith("lm_head") else "model." + n
            m.lora_A.weight.copy_(sd[f"base_model.model.{hf}.lora_A.weight"])
            m.lora_B.weight.copy_(sd[f"base_model.model.{hf}.lora_B.weight"])
