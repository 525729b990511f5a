"""The training fast path: which fused implementation replaces which part of the model.

`apply_fast_path(model, cfg)` changes a `tinyllama.model.Llama` in place, keeping every parameter
and its name (checkpoints and FSDP2 see the same model):
  * the output head + loss become the chunked `linear_cross_entropy` (no full logits);
  * each block becomes the fused training block (`kernels.fused_block`: Triton kernels, fewest saved
    activations; the default on CUDA), or is compiled on its own with `torch.compile` (`compile_blocks`),
    or, with `triton_kernels`, runs eagerly with the Triton RMSNorm / rotary / SwiGLU as separate modules;
  * attention can be pinned to one SDPA backend (flash, cuDNN, efficient).
Apply it before `fully_shard` / FSDP2 and before moving the optimizer's parameters anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tinyllama.config import build_config
from tinyllama.errors import TinyLlamaError
from tinyllama.kernels.attention import causal_attention, fa4_problem
from tinyllama.kernels.cross_entropy import LinearCrossEntropyLoss
from tinyllama.model import MLP, Attention, Llama, RMSNorm, apply_rope, ensure_unfused

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fa4")


@dataclass
class KernelConfig:
    """Which fused kernels the training step uses (`KernelConfig.from_dict` reads a YAML mapping)."""

    fused_cross_entropy: bool = True  # chunked head + loss, never the full logits
    ce_chunk_rows: Optional[int] = None  # rows per chunk; None: ~512 MB of fp32 logits per chunk
    # torch.compile each decoder block on its own; None: only when the model is on a GPU and the fused blocks
    # are off (on the CPU the compile takes minutes and gains little).
    compile_blocks: Optional[bool] = None
    # Eager Triton RMSNorm/rotary/SwiGLU modules (used when compile_blocks is off and fused_blocks is not
    # on): as fast as the compiled blocks on H100 (69.98 k vs 70.12 k tokens/s), as much memory.
    triton_kernels: bool = False
    attention_backend: str = "auto"  # SDPA: auto | flash | cudnn | efficient | math; fa4: flash-attn-4
    # Each block as the fused training block (tinyllama.kernels.fused_block): Triton kernels, q/k/v and
    # gate/up as one GEMM each, residual adds in the GEMM epilogues, and only the activations backward
    # cannot cheaply recompute are kept (~0.66 instead of ~0.97 GB per layer at 8 x 2048 on 1.1B).
    # None: on for a model on CUDA with Triton installed, unless compile_blocks, triton_kernels or an
    # activation_memory_budget below 1 asks for another block path.
    fused_blocks: Optional[bool] = None
    # One GEMM for q/k/v and one for gate/up (weights concatenated each step). Measured on H100: +0.6 %
    # tokens/s (within run-to-run noise) for +1.7 GB peak, hence off.
    fuse_projections: bool = False
    # Under autocast, keep the residual stream in the autocast dtype (bf16), as FSDP2's bf16 mixed
    # precision does anyway: halves the residual activations and the bytes of every pointwise op.
    bf16_residual: bool = True
    # Compiled blocks only: the share of the default saved activations the compile partitioner may keep;
    # below 1.0 it recomputes more in backward (0.7: peak 38.3 -> 27.9 GB for -5 % tokens/s on 1.1B, 8×2048, H100).
    activation_memory_budget: float = 1.0

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise TinyLlamaError(
                f"kernels config: field 'attention_backend' is '{self.attention_backend}'; choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if not (isinstance(self.activation_memory_budget, (int, float)) and 0 < self.activation_memory_budget <= 1):
            raise TinyLlamaError(
                f"kernels config: field 'activation_memory_budget' must be in (0, 1], got {self.activation_memory_budget!r}"
            )
        if self.ce_chunk_rows is not None and (not isinstance(self.ce_chunk_rows, int) or self.ce_chunk_rows <= 0):
            raise TinyLlamaError(f"kernels config: field 'ce_chunk_rows' must be a positive integer, got {self.ce_chunk_rows!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KernelConfig":
        return build_config(cls, d, "kernels config")


class FastAttention(Attention):
    """Attention whose training path (no cache, no mask) uses one q/k/v GEMM, a pinned SDPA backend
    and/or Triton rotary. Parameters stay q_proj/k_proj/v_proj/o_proj."""

    attention_backend: str = "auto"
    triton_rope: bool = False
    fuse_projections: bool = False

    def forward(self, x, cos, sin, input_pos=None, mask=None, slots=None):
        if input_pos is not None or mask is not None or self.kv_cache is not None or cos.dim() != 2:
            return super().forward(x, cos, sin, input_pos, mask, slots)
        B, T, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.fuse_projections:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            q, k, v = F.linear(x, w).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.triton_rope and q.is_cuda:
            from tinyllama.kernels.triton_ops import rope

            q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
        else:
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        y = causal_attention(q, k, v, self.attention_backend)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FusedMLP(MLP):
    """SwiGLU with gate and up projections as one GEMM (parameters stay gate_proj/up_proj/down_proj)."""

    triton_swiglu: bool = False

    def forward(self, x):
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        if self.triton_swiglu and x.is_cuda:
            from tinyllama.kernels.triton_ops import swiglu

            return self.down_proj(swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


class AutocastEmbedding(torch.nn.Embedding):
    """Embedding whose output is cast to the autocast dtype, so the residual stream stays in it."""

    def forward(self, ids):
        y = super().forward(ids)
        if torch.is_autocast_enabled(y.device.type):
            y = y.to(torch.get_autocast_dtype(y.device.type))
        return y


class TritonRMSNorm(RMSNorm):
    """RMSNorm through the fused Triton kernel on CUDA (one pass forward, one backward)."""

    def forward(self, x):
        if not x.is_cuda:
            return super().forward(x)
        from tinyllama.kernels.triton_ops import rms_norm

        return rms_norm(x, self.weight, self.eps)


class TritonSwiGLUMLP(MLP):
    """SwiGLU MLP whose silu(gate)·up is one Triton kernel that recomputes silu in backward."""

    def forward(self, x):
        if not x.is_cuda:
            return super().forward(x)
        from tinyllama.kernels.triton_ops import swiglu

        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def resolve_kernel_config(config: Any) -> KernelConfig:
    if config is None:
        return KernelConfig()
    if isinstance(config, KernelConfig):
        return config
    if isinstance(config, dict):
        return KernelConfig.from_dict(config)
    nested = getattr(config, "kernels", None)
    if isinstance(nested, (KernelConfig, dict)):
        return resolve_kernel_config(nested)
    return KernelConfig()  # e.g. a ModelConfig: nothing to choose, use the defaults


def apply_fast_path(model: Llama, config: Any = None) -> Llama:
    """Switch `model` to the fused training kernels chosen by `config` (a KernelConfig; None: defaults).

    In place; returns the model. Parameters, their names and the model's function stay the same
    (up to bf16 rounding order), so checkpoints, the optimizer and FSDP2 are unaffected.
    """
    cfg = resolve_kernel_config(config)
    if not isinstance(model, Llama):
        raise TinyLlamaError(f"apply_fast_path expects a tinyllama Llama model, got {type(model).__name__}")
    ensure_unfused(model, "the training fast path")
    on_gpu = any(p.is_cuda for p in model.parameters())
    from tinyllama.kernels.triton_ops import triton_available

    fused_blocks = cfg.fused_blocks
    if fused_blocks is None:  # on unless a setting asks for another block path
        fused_blocks = (on_gpu and triton_available() and cfg.compile_blocks is None and not cfg.triton_kernels
                        and cfg.activation_memory_budget == 1.0)
    elif fused_blocks:
        clash = [name for name, on in (("compile_blocks", cfg.compile_blocks), ("triton_kernels", cfg.triton_kernels),
                                       ("activation_memory_budget < 1", cfg.activation_memory_budget < 1.0)) if on]
        if clash:
            raise TinyLlamaError(f"kernels config: fused_blocks is on together with {', '.join(clash)}, which apply to "
                                 "the other block paths; turn one of them off")
    compile_blocks = (on_gpu if cfg.compile_blocks is None else cfg.compile_blocks) and not fused_blocks
    use_triton = (cfg.triton_kernels and not compile_blocks) or (fused_blocks and on_gpu)
    if cfg.attention_backend == "fa4" and (problem := fa4_problem(on_gpu)):
        raise TinyLlamaError(f"kernels config: attention_backend 'fa4' {problem}; or choose 'auto'")
    if use_triton and not triton_available():
        which = "fused_blocks" if fused_blocks else "triton_kernels"
        raise TinyLlamaError(f"kernels.{which} is on but Triton is not installed; pip install triton or turn it off")
    if fused_blocks:  # its own q/k/v and gate/up GEMMs, norms, rotary and SwiGLU
        from tinyllama.kernels.fused_block import FusedBlock

        for block in model.layers:
            block.__class__ = FusedBlock
            block.attention_backend = cfg.attention_backend
    else:
        if cfg.attention_backend != "auto" or use_triton or cfg.fuse_projections:
            for block in model.layers:
                attn = block.self_attn
                attn.__class__ = FastAttention
                attn.attention_backend = cfg.attention_backend
                attn.triton_rope = use_triton
                attn.fuse_projections = cfg.fuse_projections
        if cfg.fuse_projections:
            for block in model.layers:
                block.mlp.__class__ = FusedMLP
                block.mlp.triton_swiglu = use_triton
        elif use_triton:
            for block in model.layers:
                block.mlp.__class__ = TritonSwiGLUMLP
        if use_triton:
            for block in model.layers:
                block.input_layernorm.__class__ = TritonRMSNorm
                block.post_attention_layernorm.__class__ = TritonRMSNorm
    if use_triton:
        model.norm.__class__ = TritonRMSNorm
    if cfg.bf16_residual and type(model.embed_tokens) is torch.nn.Embedding:
        model.embed_tokens.__class__ = AutocastEmbedding
    if cfg.fused_cross_entropy:
        model.loss_fn = LinearCrossEntropyLoss(chunk_rows=cfg.ce_chunk_rows)
    if compile_blocks:
        for block in model.layers:
            if cfg.activation_memory_budget < 1.0:
                _compile_with_memory_budget(block, float(cfg.activation_memory_budget))
            else:
                block.compile()
    return model


def _compile_with_memory_budget(block: torch.nn.Module, budget: float) -> None:
    """Compile `block` so that its partitioner runs under `budget` without changing it for anything else.

    The partitioner reads a process-wide setting when the block is first compiled (on its first call),
    so every call of the compiled block runs inside a scoped patch of that setting.
    """
    import functools

    from torch._functorch import config as functorch_config

    compiled = torch.compile(block.forward)

    @functools.wraps(block.forward)
    def forward(*args, **kwargs):
        with functorch_config.patch(activation_memory_budget=budget):
            return compiled(*args, **kwargs)

    block.forward = forward
