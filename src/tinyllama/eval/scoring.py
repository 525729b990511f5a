"""Log-likelihood scoring of (context, continuation) pairs and rolling windows.

Tokenisation, truncation and window rules follow lm-evaluation-harness's `hf` backend exactly, so a
score computed here equals the harness's on the same model: trailing spaces of the context move to the
continuation, the pair is tokenised whole and split at the context's length, inputs keep the last
`max_length + 1` tokens, and rolling windows predict disjoint spans each conditioned on the tokens before.

Requests are sorted longest first and batched with right padding: under a causal mask, padding after a
sequence cannot change its logits, so no attention mask is needed and the results equal unbatched ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class ScoredRequest:
    context: list[int]
    continuation: list[int]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Split `tokens` into (context, continuation) windows that score every token exactly once.

    The first window predicts tokens[:max_len] from prefix_token; each later one predicts the next
    max_len tokens (fewer at the end) from as many preceding tokens as fit in max_len. This is the
    harness's `get_rolling_token_windows(context_len=1)` followed by `make_disjoint_window`.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    windows = []
    first = min(max_len, len(tokens))
    ctx, cont = [prefix_token] + tokens[: first - 1], tokens[:first]
    windows.append((ctx[: len(ctx) - (len(cont) - 1)], cont))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        ctx = tokens[max(0, end - max_len - 1): end - 1]
        cont = tokens[end - n: end]
        windows.append((ctx[: len(ctx) - (n - 1)], cont))
        done = end
    return windows


class Scorer:
    """Scores token requests with a causal LM: `model(ids) -> logits (B, T, vocab)`.

    `batch_size` bounds sequences per forward pass; `max_length` is the context the model sees (default:
    the model's `config.max_seq_len`).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None,
                 device=None, add_bos: Optional[bool] = None, progress: Optional[Callable[[int, int], None]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or model.config.max_seq_len)
        self.device = device or next(model.parameters()).device
        # Llama tokenizers prepend BOS by default (tokenizer_config `add_bos_token`); the harness keeps that.
        self.add_bos = bool(tokenizer.config.get("add_bos_token", True)) if add_bos is None else add_bos
        self.progress = progress

    # ---- tokenisation (the harness's `tok_encode` / `_encode_pair`) ------------------------------------
    def encode(self, text: str, special: Optional[bool] = None) -> list[int]:
        bos = self.add_bos if special is None else special
        return self.tokenizer.encode(text, bos=bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, special=False)
            bos = self.tokenizer.bos_id
            return ([bos], cont) if not cont or cont[0] != bos else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- scoring ---------------------------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) strings -> (sum log p(continuation | context), continuation is greedy)."""
        return self.score_tokens([ScoredRequest(*self.encode_pair(c, x)) for c, x in pairs])

    def loglikelihood_rolling(self, texts: Sequence[str], add_bos: Optional[bool] = None) -> list[float]:
        """Total log-likelihood of each text over disjoint rolling windows of `max_length` tokens."""
        reqs, owner = [], []
        for i, text in enumerate(texts):
            for ctx, cont in rolling_windows(self.encode(text, special=add_bos), self.tokenizer.bos_id, self.max_length):
                reqs.append(ScoredRequest(ctx, cont))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.score_tokens(reqs)):
            totals[i] += ll
        return totals

    @torch.inference_mode()
    def score_tokens(self, requests: Sequence[ScoredRequest]) -> list[tuple[float, bool]]:
        L = self.max_length
        prepared = []
        for r in requests:
            if not r.continuation:
                raise ValueError("empty continuation: nothing to score")
            if len(r.continuation) > L:
                raise ValueError(f"continuation of {len(r.continuation)} tokens exceeds the context of {L}")
            inp = (r.context + r.continuation)[-(L + 1):][:-1]
            prepared.append((inp, r.continuation))
        results: list[Optional[tuple[float, bool]]] = [None] * len(prepared)
        done = 0
        for idx, logits in batched_logits(self.model, [inp for inp, _ in prepared], self.tokenizer.eos_id,
                                          self.batch_size, self.device):
            for row, i in enumerate(idx):
                inp, cont = prepared[i]
                n = len(cont)
                lp = F.log_softmax(logits[row, len(inp) - n: len(inp)].float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (float(lp.gather(-1, target[:, None]).sum()), greedy)
            done += len(idx)
            if self.progress is not None:
                self.progress(done, len(prepared))
        return results  # type: ignore[return-value]


def batched_logits(model, inputs: Sequence[Sequence[int]], pad_id: int, batch_size: int, device):
    """One forward pass per batch of token lists: yields (indices into `inputs`, logits (B, T, vocab)); row b
    holds inputs[indices[b]] right-padded with pad_id, whose logits equal an unpadded pass (causal mask).
    Longest first: the first batch is the largest, so an out-of-memory shows up at once; less padding."""
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), list(inputs[i])))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = torch.full((len(idx), len(inputs[idx[0]])), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(inputs[i])] = torch.tensor(list(inputs[i]), dtype=torch.long)
        yield idx, model(batch.to(device))
