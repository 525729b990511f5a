"""The Llama 2 / TinyLlama decoder in one file.

Pre-norm RMSNorm, rotary embeddings in the Hugging Face rotate-half layout, grouped-query causal
attention through `scaled_dot_product_attention`, SwiGLU MLP, untied output head. Parameter names match
Hugging Face's `LlamaForCausalLM` without its `model.` prefix, so checkpoints convert by renaming only.

This file knows nothing of distributed training, files or the command line: parallelism (FSDP2),
compilation and fused kernels are applied from outside (see `tinyllama.train`, `tinyllama.kernels`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyllama.config import ModelConfig
from tinyllama.errors import fused_projections_error


def ensure_unfused(model: nn.Module, purpose: str) -> None:
    """Refuse, with a clear message, to use a model fused by `Llama.fuse_projections` where the separate
    q/k/v and gate/up weights are needed (saving, GGUF export, LoRA, training kernels)."""
    if getattr(model, "projections_fused", False):
        raise fused_projections_error(purpose)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order Hugging Face uses, so bf16 results match.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) in fp32, halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or (B, 1, T, D), already in x's dtype."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static, pre-allocated key/value cache for one layer: (B, n_kv_heads, max_len, head_dim).

    GQA-aware: it stores only the key/value heads, never the repeated ones. Shapes never change, so a
    compiled decode step can be captured in a CUDA graph.

    `update` writes and returns what the batch attends over; `write` only writes (a prompt from position 0
    attends over its own keys, `Llama.forward(from_start=True)`). Both take the positions in one of two forms:
      - input_pos (T,): the same positions in every row; the batch is the whole cache (batched generation,
        the compiled decode step of `tinyllama.generate`);
      - input_pos (B, T): each row its own positions (rows of a continuous batch at different lengths).
        Batch row b goes to cache row slots[b] if `slots` (B,) is given (`update` then gathers the rows it
        attends over, a copy: fine for a chunk of a few tokens), else to cache row b: the batch is the cache's
        first B rows, and what it attends over is a view of them (nothing copied: the form for decode steps).
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device=None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: Optional[torch.Tensor] = None) -> None:
        """Write k, v (B, KV, T, D) at input_pos (a prompt from position 0 needs nothing back)."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
            return
        rows = slots if slots is not None else torch.arange(k.size(0), device=input_pos.device)
        rows = rows[:, None].expand_as(input_pos)
        # cache[rows[b, t], :, input_pos[b, t]] = k[b, :, t]
        self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               slots: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at input_pos; return the keys and values the batch attends over."""
        self.write(input_pos, k, v, slots)
        if input_pos.dim() == 1:
            return self.k, self.v
        B = k.size(0)
        if slots is None:
            return self.k[:B], self.v[:B]
        return self.k.index_select(0, slots), self.v.index_select(0, slots)


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One new query per row against the cache: q (B, H, 1, D), k/v (B, KV, S, D), mask (1 or B, 1, 1, S) bool.

    The H query heads are viewed as KV groups, so k/v are never repeated. Used for decode steps: SDPA with a
    boolean mask over the static cache, compiled (torch 2.11, H100), drifted from eager after a few tokens,
    while this form agrees with eager and is as fast (perf/NOTES.md, decode).
    """
    B, H, _, D = q.shape
    KV = k.size(1)
    scores = torch.matmul(q.view(B, KV, H // KV, D), k.transpose(-1, -2))  # (B, KV, G, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * D**-0.5  # softmax in >= fp32
    scores = scores.masked_fill(~mask.view(mask.size(0), 1, 1, -1), float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, d
        self.q_proj = nn.Linear(h, config.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.n_heads * d, h, bias=False)
        self.qkv_proj: Optional[nn.Linear] = None  # set by Llama.fuse_projections (inference)
        self.kv_cache: Optional[KVCache] = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> q (B, H, T, D), k and v (B, KV, T, D), before rotary; fused or not."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        slots: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """With input_pos and a cache, `mask` None means a prompt from position 0 (Llama.forward builds a mask
        for every other cached call): the cache is written and the attention is causal over the new keys."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            if mask is None:  # a prompt from position 0 (Llama.forward's from_start): its own keys are all it sees
                self.kv_cache.write(input_pos, k, v, slots)
            else:
                k, v = self.kv_cache.update(input_pos, k, v, slots)
        gqa = self.n_kv_heads != self.n_heads
        if T == 1 and mask is not None:
            y = one_token_attention(q, k, v, mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: Optional[nn.Linear] = None  # set by Llama.fuse_projections (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos=None, mask=None, slots=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_mask", None, persistent=False)
        # A fused output-head + cross-entropy (tinyllama.kernels) may be plugged in from outside.
        self.loss_fn = None
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """TinyLlama's init: N(0, sqrt(2/(5·hidden))); output projections N(0, 1/sqrt(hidden)/n_layers).

        Also recomputes the rotary tables, so a model built on `meta` then `to_empty()`-ed is complete.
        """
        c = self.config
        std = math.sqrt(2.0 / (5 * c.hidden_size))
        proj_std = 1.0 / math.sqrt(c.hidden_size) / c.n_layers
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                out_proj = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=proj_std if out_proj else std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        device = self.rope_cos.device
        cos, sin = rope_cache(c.max_seq_len, c.head_dim, c.rope_theta, device=device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # ---- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None, device=None) -> None:
        max_len = max_len or self.config.max_seq_len
        if max_len > self.rope_cos.shape[0]:
            raise ValueError(f"cache length {max_len} exceeds the model's context of {self.rope_cos.shape[0]}")
        # The embedding table, not the head: the head may be weight-only quantized (tinyllama.quantize).
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, c.n_kv_heads, max_len, c.head_dim, dtype, device)
        self.causal_mask = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.causal_mask = None

    @property
    def has_cache(self) -> bool:
        return self.causal_mask is not None

    # ---- inference-only fusion -----------------------------------------------------------------
    @torch.no_grad()
    def fuse_projections(self) -> "Llama":
        """Concatenate q/k/v and gate/up weights into one matrix each (three matrix products per layer fewer:
        a decode step is bound by its kernel count). In place, for inference: the parameter names change,
        so save, export or fine-tune a model before fusing it (`ensure_unfused` guards those paths). Layers
        that are not plain nn.Linear (quantized) stay as they are."""
        def fused(parts: list) -> Optional[nn.Linear]:
            if any(type(m) is not nn.Linear or m.bias is not None for m in parts):
                return None
            w = torch.cat([m.weight for m in parts])
            lin = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=parts[0].weight.requires_grad)
            return lin

        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            if a.qkv_proj is None and (qkv := fused([a.q_proj, a.k_proj, a.v_proj])) is not None:
                a.qkv_proj = qkv
                del a.q_proj, a.k_proj, a.v_proj
            if m.gate_up_proj is None and (gate_up := fused([m.gate_proj, m.up_proj])) is not None:
                m.gate_up_proj = gate_up
                del m.gate_proj, m.up_proj
        return self

    @property
    def projections_fused(self) -> bool:
        return any(layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None for layer in self.layers)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        input_pos: Optional[torch.Tensor] = None,
        rope_pos: Optional[torch.Tensor] = None,
        key_mask: Optional[torch.Tensor] = None,
        slots: Optional[torch.Tensor] = None,
        logits_at: Optional[torch.Tensor] = None,
        from_start: bool = False,
    ):
        """ids (B, T) -> logits (B, T, vocab); with targets, returns (logits, mean cross-entropy).

        input_pos: the cache positions of these tokens (needs `setup_cache`); without it, a plain causal pass.
          (T,): the same positions in every row, the batch being the whole cache;
          (B, T): each row at its own positions, in cache row slots[b] with `slots` (B,), else in row b
          (see `KVCache`). Each row attends to its own cache row's positions up to its own.
        rope_pos (T,) or (B, T): rotary positions if they differ from the cache positions (left-padded batches).
        key_mask (B, S) bool: which cache positions hold real tokens (False for padding).
        logits_at (B,): only the logits of column logits_at[b] of each row, as (B, vocab): a prefill needs
          one column, and the head over all T columns would cost T times as much.
        from_start: input_pos is 0..T-1 in every row (a prompt's prefill; no key_mask; the caller's word, not
          checked, which would cost a host sync): the cache is written as usual, and the attention runs
          causally over the T new keys alone. Over the cache it needs a mask, and with GQA torch documents
          SDPA on the flash and math kernels only: a mask means math (fp32 scores).
        """
        B, T = ids.shape
        if rope_pos is None:
            rope_pos = input_pos if input_pos is not None else torch.arange(T, device=ids.device)
        if T > self.rope_cos.shape[0] or (input_pos is None and T > self.config.max_seq_len):
            raise ValueError(f"sequence length {T} exceeds the model's context of {self.config.max_seq_len}")
        if slots is not None and (input_pos is None or input_pos.dim() != 2):
            raise ValueError("slots needs per-row cache positions: input_pos of shape (B, T)")
        x = self.embed_tokens(ids)
        cos = self.rope_cos[rope_pos].to(x.dtype)
        sin = self.rope_sin[rope_pos].to(x.dtype)
        if cos.dim() == 3:  # per-row positions: (B, T, D) -> (B, 1, T, D)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        if from_start and (input_pos is None or key_mask is not None):
            raise ValueError("from_start needs input_pos (0..T-1) and takes no key_mask (padding needs the mask)")
        if input_pos is not None and self.causal_mask is None:
            raise RuntimeError("input_pos given but no KV cache: call setup_cache() first")
        mask = None
        if input_pos is not None and not from_start:
            # (T,) -> (1, 1, T, S), one mask for the batch; (B, T) -> (B, 1, T, S), one per row
            mask = self.causal_mask[input_pos].view(-1, 1, T, self.causal_mask.size(-1))
        elif key_mask is not None:
            mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril().view(1, 1, T, T)
        if key_mask is not None:
            # Padding keys are hidden; every query still sees itself so padded rows stay finite (no NaN).
            positions = input_pos if input_pos is not None else torch.arange(T, device=ids.device)
            self_pos = F.one_hot(positions, mask.size(-1)).bool().view(-1, 1, T, mask.size(-1))
            mask = (mask & key_mask[:, None, None, :]) | self_pos

        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, slots)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # (B, hidden)
        x = self.norm(x)

        if targets is None:
            return self.lm_head(x)
        if self.loss_fn is not None:
            # Fused head + loss: never materialises the (B·T, vocab) logits.
            return None, self.loss_fn(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # ---- checkpoints (I/O lives in tinyllama.convert) ------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Llama":
        """A Hugging Face Llama directory (config.json + safetensors) -> model, in its saved dtype by default."""
        from tinyllama.convert.hf import (
            check_state_dict,
            parse_dtype,
            read_hf_checkpoint,
        )

        config, sd = read_hf_checkpoint(path)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model.state_dict(), sd, path)
        dtype = parse_dtype(dtype) or next(iter(sd.values())).dtype
        model = model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
        model.init_weights()  # the rotary tables; the weights are overwritten below
        model = model.to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rope_cos.data, model.rope_sin.data = model.rope_cos.float(), model.rope_sin.float()  # fp32 always
        return model

    def save_pretrained(self, path, tokenizer=None, dtype=None, max_shard_size: int = 2 * 1024**3,
                        overwrite: bool = True) -> None:
        from tinyllama.convert.hf import save_hf_model

        save_hf_model(self, path, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
