"""Token log-probabilities for `/v1/completions` (`logprobs`, `echo`), with OpenAI's legacy-completions shape.

`choices[i].logprobs` is `{tokens, token_logprobs, top_logprobs, text_offset}`, one entry per token of the
choice's text: with `echo`, the prompt's tokens first (the first has no log-probability: null), then the
completion's. `tokens[k]` is the text token k adds to the choice's `text` (so they concatenate to it; a
special token such as BOS adds "" and a token ending inside a UTF-8 character adds "" until the character is
whole), `text_offset[k]` where it starts in `text`, and `top_logprobs[k]` the `logprobs` most likely tokens at
that position plus the chosen one (OpenAI returns up to logprobs + 1). This is what lm-evaluation-harness's
`local-completions` model asks for to score log-likelihoods: `echo`, `logprobs: 1`, `max_tokens` 0 or 1.

Every value comes from ONE `Llama.forward` over the prompt and the completion (teacher-forced, batched over
the choices), so a token's log-probability is the model's, before temperature or top-p, and a prompt is
scored exactly as `tinyllama eval` scores it. The pass runs in a worker thread, never on the event loop;
it shares the (read-only) weights with the engine thread and no cache (`forward` without `input_pos`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tinyllama.eval.scoring import batched_logits

MAX_LOGPROBS = 5  # OpenAI's limit for legacy completions
TOKEN_BUDGET = 8192  # tokens per forward pass: (B, T, vocab) float logits stay a few hundred MB at 32 k vocab
DECODE_WINDOW = 8  # ids decoded before a token to find its text (its leading space, a split UTF-8 sequence)

# One pass at a time: concurrent requests queue here instead of splitting the CPU threads / GPU between them.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyllama-logprobs")


@torch.inference_mode()
def sequence_logprobs(model, seqs: Sequence[Sequence[int]], n_top: int, device, pad_id: int = 0):
    """For each id sequence: (log p(token k | tokens before it) for every k, None for k = 0;
    the n_top most likely tokens at each position as [(id, logprob)], None for k = 0)."""
    unique = list(dict.fromkeys(tuple(s) for s in seqs))  # n choices of one prompt with max_tokens 0 are equal
    inputs = [list(s[:-1]) for s in unique if len(s) > 1]
    owner = [u for u, s in enumerate(unique) if len(s) > 1]
    out: list = [([None], [None]) for _ in unique]
    if inputs:
        batch_size = max(1, TOKEN_BUDGET // max(len(x) for x in inputs))
        for idx, logits in batched_logits(model, inputs, pad_id, batch_size, device):
            for row, i in enumerate(idx):
                seq = unique[owner[i]]
                lp = F.log_softmax(logits[row, : len(seq) - 1].float(), dim=-1)
                target = torch.tensor(seq[1:], dtype=torch.long, device=lp.device)
                chosen = lp.gather(-1, target[:, None])[:, 0].tolist()
                if n_top:
                    values, ids = lp.topk(n_top, dim=-1)
                    tops = [list(zip(a, b)) for a, b in zip(ids.tolist(), values.tolist())]
                else:
                    tops = [[] for _ in chosen]
                out[owner[i]] = ([None] + chosen, [None] + tops)
    where = {s: u for u, s in enumerate(unique)}
    return [out[where[tuple(s)]] for s in seqs]


def _piece(tokenizer, context: list[int], token: int) -> str:
    base = tokenizer.decode(context)
    return tokenizer.decode(context + [token])[len(base):]


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each id adds to `tokenizer.decode(ids)`; they concatenate to it. Each is found by decoding a
    short window of ids, so the cost is linear in len(ids)."""
    ids = [int(i) for i in ids]
    pieces, start = [], 0  # ids[start:] are not in the text yet (an unfinished UTF-8 sequence)
    for k in range(len(ids)):
        context = ids[max(0, start - DECODE_WINDOW): start]
        base = tokenizer.decode(context)
        text = tokenizer.decode(context + ids[start: k + 1])
        if text.endswith("\ufffd") and k + 1 < len(ids):  # wait for the character's remaining bytes
            pieces.append("")
            continue
        pieces.append(text[len(base):])
        start = k + 1
    return pieces


def logprobs_body(tokenizer, seq: Sequence[int], lps: list, tops: list, first: int) -> dict:
    """OpenAI's `logprobs` object for tokens seq[first:] (offsets from the start of their text)."""
    seq = [int(t) for t in seq]
    pieces = token_pieces(tokenizer, seq)[first:]
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    top_logprobs: list[Optional[dict]] = []
    for k in range(first, len(seq)):
        if tops[k] is None:
            top_logprobs.append(None)
            continue
        context = seq[max(0, k - DECODE_WINDOW): k]
        d = {}
        for alt, lp in tops[k]:
            d.setdefault(_piece(tokenizer, context, alt), lp)
        # The chosen token too; if another id has the same text, the likelier one's value stays (both listed
        # under one key would hide which was chosen, so greedy checks stay conservative).
        d.setdefault(_piece(tokenizer, context, seq[k]), lps[k])
        top_logprobs.append(d)
    return {"tokens": pieces, "token_logprobs": lps[first:], "top_logprobs": top_logprobs, "text_offset": offsets}


def completion_logprobs(model, tokenizer, device, prompts: Sequence[list[int]], completions: Sequence[list[int]],
                        n_top: int, echo: bool) -> list[dict]:
    """`logprobs` objects for choices (prompt ids, completion ids): one batched forward pass for all."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    scored = sequence_logprobs(model, seqs, n_top, device, pad_id=tokenizer.eos_id)
    return [logprobs_body(tokenizer, s, lps, tops, 0 if echo else len(p))
            for s, p, (lps, tops) in zip(seqs, prompts, scored)]


async def completion_logprobs_async(model, tokenizer, device, prompts, completions, n_top: int, echo: bool):
    """`completion_logprobs` in the worker thread (the forward pass and the decoding are CPU/GPU work)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_WORKER, completion_logprobs, model, tokenizer, device, prompts, completions,
                                      n_top, echo)
