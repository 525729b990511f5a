"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for any draft/target pair sharing a tokenizer.

Each round the draft proposes k tokens one by one; the target scores all of them in one forward pass of
k+1 tokens. Greedy: a draft token is kept while it equals the target's argmax, so the output is the target's
own greedy output. Sampling: draft token d is kept with probability min(1, p(d)/q(d)); on the first
rejection a token is drawn from normalise(max(0, p - q)); if all k are kept, a bonus token is drawn from the
target's next distribution. The output is then distributed exactly as the target's (p and q are the
distributions after temperature / top-k / top-p / min-p, the same filters for both models).

Both models keep a static KV cache; entries written for rejected tokens are simply overwritten later (the
causal mask never lets a position see slots beyond itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from tinyllama.generate import GenerationError, SamplingConfig, _check_prompts, _StopMatcher, process_logits
from tinyllama.model import Llama


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # draft tokens the target kept
    rounds: int = 0  # target forward passes after the prompt
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "acceptance_rate": round(self.acceptance_rate, 4),
                "rounds": self.rounds, "new_tokens": self.new_tokens,
                "tokens_per_round": round(self.tokens_per_round, 3), "seconds": round(self.seconds, 4)}


def _probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    return process_logits(logits, cfg).softmax(-1)


def verify(
    target_logits: torch.Tensor,
    draft_tokens: Sequence[int],
    draft_probs: Optional[torch.Tensor],
    cfg: SamplingConfig,
    generator: Optional[torch.Generator] = None,
) -> tuple[list[int], int]:
    """Accept/reject one round. target_logits (k+1, V) score the positions of the k drafts and the one after;
    draft_probs (k, V) is the draft's sampling distribution (unused when greedy).

    Returns (new tokens, number of draft tokens accepted): the accepted drafts plus one corrected or bonus token.
    """
    k = len(draft_tokens)
    if cfg.temperature == 0:
        best = target_logits.argmax(-1).tolist()
        out = []
        for i, d in enumerate(draft_tokens):
            if d != best[i]:
                return out + [best[i]], i
            out.append(d)
        return out + [best[k]], k
    p = _probs(target_logits, cfg)  # (k+1, V)
    if k == 0:
        return [int(torch.multinomial(p[0], 1, generator=generator).item())], 0
    device = p.device
    idx = torch.tensor(list(draft_tokens), device=device, dtype=torch.long)
    p_d = p[:k].gather(1, idx[:, None]).squeeze(1)
    q_d = draft_probs.gather(1, idx[:, None]).squeeze(1)
    u = torch.rand(k, device=device, generator=generator)
    keep = (u * q_d <= p_d).tolist()  # u < p/q without dividing by a zero q
    out = []
    for i, d in enumerate(draft_tokens):
        if not keep[i]:
            residual = (p[i] - draft_probs[i]).clamp(min=0)
            if residual.sum() <= 0:  # p == q: the residual is empty, p itself is the right distribution
                residual = p[i]
            tok = torch.multinomial(residual / residual.sum(), 1, generator=generator).item()
            return out + [int(tok)], i
        out.append(d)
    bonus = torch.multinomial(p[k], 1, generator=generator).item()
    return out + [int(bonus)], k


@torch.inference_mode()
def speculative_stream(
    target: Llama,
    draft: Llama,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    *,
    k: int = 4,
    eos_id: Optional[int] = None,
    tokenizer=None,
    stats: Optional[SpeculativeStats] = None,
) -> Iterator[int]:
    """Yield the target's continuation of one prompt, drafted k tokens at a time. Stops like generate_stream."""
    cfg.validate()
    if k < 1:
        raise GenerationError(f"speculative k (draft tokens per round) must be >= 1, got {k}")
    if cfg.repetition_penalty != 1.0:
        raise GenerationError("speculative decoding does not support repetition_penalty; set it to 1.0")
    if target.config.vocab_size != draft.config.vocab_size:
        raise GenerationError(
            f"draft vocab_size {draft.config.vocab_size} != target vocab_size {target.config.vocab_size}: "
            "the two models must share a tokenizer"
        )
    if cfg.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer: pass tokenizer=...")
    _check_prompts(target, [prompt_ids], cfg)
    _check_prompts(draft, [prompt_ids], cfg)
    stats = stats if stats is not None else SpeculativeStats()
    t0 = time.perf_counter()
    eos_id = target.config.eos_id if eos_id is None else eos_id
    seq = [int(t) for t in prompt_ids]
    T = len(seq)
    total = min(T + cfg.max_new_tokens, target.config.max_seq_len, draft.config.max_seq_len)
    n_new = total - T
    if n_new <= 0:
        return
    t_dev = target.embed_tokens.weight.device
    d_dev = draft.embed_tokens.weight.device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=t_dev).manual_seed(cfg.seed)
    d_generator = generator if d_dev == t_dev or cfg.seed is None else torch.Generator(d_dev).manual_seed(cfg.seed)
    matcher = _StopMatcher(tokenizer, cfg.stop, seq) if cfg.stop else None

    def run(model, tokens, start, device):
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        return model(ids, input_pos=torch.arange(start, start + len(tokens), device=device))[0]

    target.setup_cache(1, total, dtype=target.embed_tokens.weight.dtype, device=t_dev)
    draft.setup_cache(1, total, dtype=draft.embed_tokens.weight.dtype, device=d_dev)
    try:
        # Invariant: the target's cache holds seq[:-1]; the draft's holds seq[:draft_len].
        if T > 1:
            run(target, seq[:-1], 0, t_dev)
        draft_len = 0
        produced = 0
        while produced < n_new:
            remaining = n_new - produced
            k_eff = min(k, remaining - 1)
            drafts: list[int] = []
            draft_probs = []
            if k_eff > 0:
                logits = run(draft, seq[draft_len:], draft_len, d_dev)[-1:]
                pos = len(seq)
                for i in range(k_eff):
                    if cfg.temperature == 0:
                        tok = int(logits.argmax(-1).item())
                    else:
                        q = _probs(logits, cfg)
                        draft_probs.append(q[0])
                        tok = int(torch.multinomial(q, 1, generator=d_generator).item())
                    drafts.append(tok)
                    if i + 1 < k_eff:
                        logits = run(draft, [tok], pos + i, d_dev)
                draft_fed = len(seq) + k_eff - 1  # positions now valid in the draft cache, if all are accepted
            t_logits = run(target, [seq[-1]] + drafts, len(seq) - 1, t_dev)
            q_all = torch.stack(draft_probs).to(t_dev) if draft_probs else None
            new, n_acc = verify(t_logits, drafts, q_all, cfg, generator)
            stats.rounds += 1
            stats.proposed += k_eff
            stats.accepted += n_acc
            if k_eff > 0:
                draft_len = min(draft_fed, len(seq) + n_acc)
            else:
                draft_len = min(draft_len, len(seq))
            for tok in new:
                if cfg.stop_at_eos and tok == eos_id:
                    return
                seq.append(tok)
                produced += 1
                stats.new_tokens += 1
                yield tok
                if matcher is not None and matcher.put(tok):
                    return
    finally:
        stats.seconds += time.perf_counter() - t0
        target.clear_cache()
        draft.clear_cache()


def speculative_generate(
    target: Llama,
    draft: Llama,
    prompt_ids: Sequence[int],
    cfg: Optional[SamplingConfig] = None,
    *,
    k: int = 4,
    eos_id: Optional[int] = None,
    tokenizer=None,
    **kwargs,
) -> tuple[list[int], SpeculativeStats]:
    """Return (new token ids, stats). kwargs override SamplingConfig fields."""
    cfg = cfg or SamplingConfig()
    if kwargs:
        cfg = cfg.replace(**kwargs)
    stats = SpeculativeStats()
    out = list(speculative_stream(target, draft, prompt_ids, cfg, k=k, eos_id=eos_id, tokenizer=tokenizer,
                                  stats=stats))
    return out, stats
