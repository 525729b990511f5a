"""Autoregressive generation with the static KV cache: greedy, temperature, top-k, top-p, seed, EOS stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from tinyllama.model import Llama


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop_at_eos: bool = True

    def validate(self) -> None:
        from tinyllama.errors import TinyLlamaError

        if self.max_new_tokens < 0:
            raise TinyLlamaError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise TinyLlamaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise TinyLlamaError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise TinyLlamaError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Filters apply in transformers' order: temperature, top-k, top-p."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; always keep the best one.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(
    model: Llama,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    eos_id: Optional[int] = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (stops at EOS, which is not yielded)."""
    cfg.validate()
    device = model.lm_head.weight.device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    T = prompt.size(1)
    if T == 0:
        raise ValueError("empty prompt: pass at least one token (e.g. BOS)")
    total = min(T + cfg.max_new_tokens, model.config.max_seq_len)
    if T >= model.config.max_seq_len and cfg.max_new_tokens > 0:
        raise ValueError(f"prompt of {T} tokens fills the model's context of {model.config.max_seq_len}")
    eos_id = model.config.eos_id if eos_id is None else eos_id
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)

    model.setup_cache(1, total)
    try:
        logits = model(prompt, input_pos=torch.arange(T, device=device))[:, -1]
        n_new = total - T
        for i in range(n_new):
            nxt = sample_next(logits, cfg, generator)
            tok = int(nxt.item())
            if cfg.stop_at_eos and tok == eos_id:
                return
            yield tok
            if i + 1 < n_new:
                pos = torch.tensor([T + i], device=device)
                logits = model(nxt.view(1, 1), input_pos=pos)[:, -1]
    finally:
        model.clear_cache()


def generate(model: Llama, prompt_ids: Sequence[int], cfg: Optional[SamplingConfig] = None, **kwargs) -> list[int]:
    """Return the new token ids (without the prompt). kwargs override SamplingConfig fields."""
    cfg = cfg or SamplingConfig()
    if kwargs:
        cfg = SamplingConfig(**{**cfg.__dict__, **kwargs})
    return list(generate_stream(model, prompt_ids, cfg))
