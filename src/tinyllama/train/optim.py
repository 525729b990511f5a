"""AdamW with TinyLlama's settings and its learning-rate curve (linear warm-up, cosine decay to min_lr)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from tinyllama.checks import (
    FRACTION, NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, check_fields, check_number, number_problem,
)
from tinyllama.errors import TinyLlamaError


FUSED_KERNELS = ("torch", "triton")


@dataclass
class OptimConfig:
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 2000
    # Length of the cosine curve; None = the run's own length (TrainConfig fills it in).
    max_steps: Optional[int] = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    fused: Optional[bool] = None  # None = fused on CUDA, plain (for-each) elsewhere
    # The fused step's kernel: 'torch' (torch's fused AdamW) or 'triton' (tinyllama.kernels.adamw, one
    # multi-tensor launch; same state_dict). Ignored when not fused.
    fused_kernel: str = "torch"
    # With fused_kernel 'triton': keep bf16 copies of the fused blocks' weights that the AdamW kernel writes as it
    # updates them, instead of casting every weight in every forward (tinyllama.kernels.weight_copies; one
    # device, bf16 autocast, pretraining and bench train; +2 bytes a parameter of memory between steps).
    # None = on wherever they apply with fused_kernel 'triton' (+0.6 % tok/s on an H100); true asks for them
    # (an error without the Triton AdamW, a note where they do not apply); false = cast each forward.
    compute_copies: Optional[bool] = None

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)

    def validate(self, auto_warmup: bool = False) -> None:
        """auto_warmup: warmup_steps may be -1, "10 % of the run" (fine-tuning fills it in once the length is known)."""
        check_fields(self, "optim config: field '{}'", lr=POSITIVE, eps=POSITIVE, weight_decay=NONNEGATIVE,
                     warmup_steps=dict(NONNEGATIVE_INT, lo=-1 if auto_warmup else 0),
                     max_steps=dict(POSITIVE_INT, none_ok=True))
        check_number(self.min_lr, f"optim config: field 'min_lr' (lr = {self.lr})", lo=0, hi=self.lr)
        check_number(self.grad_clip, "optim config: field 'grad_clip' (0 disables clipping)", **NONNEGATIVE)
        betas = self.betas
        if not isinstance(betas, tuple) or len(betas) != 2 or any(number_problem(b, **FRACTION) for b in betas):
            raise TinyLlamaError(f"optim config: field 'betas' must be two numbers in [0, 1), got {self.betas!r}")
        if self.fused_kernel not in FUSED_KERNELS:
            raise TinyLlamaError(f"optim config: field 'fused_kernel' is {self.fused_kernel!r}; choose one of "
                                 f"{', '.join(FUSED_KERNELS)}")
        if self.compute_copies is True and not self.triton_step():
            raise TinyLlamaError("optim config: field 'compute_copies' needs the fused Triton AdamW (fused_kernel: "
                                 "triton, fused unset or true), which writes the copies; turn compute_copies off")

    def triton_step(self) -> bool:
        """Whether the fused step may be tinyllama's Triton AdamW (fused unset means fused on CUDA)."""
        return self.fused_kernel == "triton" and self.fused is not False

    def wants_copies(self) -> bool:
        """compute_copies as resolved: asked for, or unset with the Triton AdamW."""
        return self.compute_copies is True or (self.compute_copies is None and self.triton_step())


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to lr, cosine to min_lr at max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = cfg.max_steps
    if total is None or step >= total:
        return cfg.min_lr if total is not None else cfg.lr
    decay_steps = max(1, total - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / decay_steps
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2: linear weights, embeddings); never norms or biases (dim < 2)."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    compute_dtype: Optional[torch.dtype] = None) -> torch.optim.AdamW:
    """compute_dtype: the forward's autocast dtype, for `compute_copies` (None or fp32: no copies)."""
    cfg.validate()
    on_cuda = any(p.is_cuda for p in model.parameters())
    fused = cfg.fused if cfg.fused is not None else on_cuda
    kwargs = dict(lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
    if fused and cfg.fused_kernel == "triton":
        from tinyllama.kernels.adamw import TritonAdamW

        optimizer = TritonAdamW(groups, **kwargs)  # torch's fused step where Triton or CUDA is missing
        if cfg.wants_copies() and compute_dtype is not None:
            from tinyllama.kernels.weight_copies import attach_compute_weights

            attach_compute_weights(model, optimizer, compute_dtype)  # None where they do not apply
        return optimizer
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = on_cuda or None
    return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_or_step_on_device(optimizer: torch.optim.Optimizer, model: nn.Module, grad_clip: float,
                           loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """After backward: the global gradient norm (a plain fp32 tensor on the device; all ranks agree under
    FSDP2) and whether the optimizer has already stepped.

    Fused AdamW steps here, without a host sync: the kernel divides the gradients by the clip factor (its
    grad_scale input, one pass over the gradients less) and leaves weights, moments and its step count
    unchanged when the norm or `loss` (already all-reduced) is not finite (its found_inf input), the rule a
    caller applies on the host afterwards to count a skipped step. Otherwise the gradients are clipped in
    place and the caller runs `optimizer.step()` once it has checked the norm and loss on the host.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm_sharded = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    sharded = hasattr(norm_sharded, "full_tensor")  # DTensor gradients (FSDP2)
    norm = (norm_sharded.full_tensor() if sharded else norm_sharded).float()
    if not optimizer.defaults.get("fused"):
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm_sharded, foreach=True)
        return norm, False
    # clip_grad_norm_'s rule: multiply by clip / (norm + 1e-6) when that is below 1.
    scale = ((norm + 1e-6) / grad_clip).clamp(min=1.0) if grad_clip > 0 else torch.ones_like(norm)
    optimizer.grad_scale = scale
    optimizer.found_inf = (~(torch.isfinite(norm) & torch.isfinite(loss))).float()
    try:
        if sharded:  # plain scalar tensors next to DTensor parameters
            from torch.distributed.tensor.experimental import implicit_replication

            with implicit_replication():
                optimizer.step()
        else:
            optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return norm, True
