"""Perplexity over documents with disjoint rolling windows: every token is scored exactly once.

A document's first token is conditioned on BOS; each later window predicts up to `window` new tokens
from as many preceding tokens as fit (see `scoring.rolling_windows`). Reports token perplexity
exp(NLL / tokens) and bits per UTF-8 byte, which compares across tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

from tinyllama.errors import TinyLlamaError
from tinyllama.eval.scoring import Scorer, ScoredRequest, rolling_windows


def iter_documents(path: Path, text_field: str = "text", limit: Optional[int] = None) -> Iterator[str]:
    """Texts from .jsonl/.json(.zst/.gz) (field `text_field`), .parquet (`text_field`, else `content`) through
    the data pipeline's reader (`tinyllama.data.readers.read_records`); any other file is one document."""
    from tinyllama.data.readers import Bad, input_kind, read_records

    path = Path(path)
    if not path.is_file():
        raise TinyLlamaError(f"{path}: text file not found")
    if limit is not None and limit <= 0:
        return
    kind = input_kind(path)
    if kind is None:  # e.g. wiki.test.raw: the whole file is one document
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TinyLlamaError(f"{path}: not UTF-8 text (give .txt, .jsonl, .jsonl.zst or .parquet)") from None
        return
    fields = (text_field, "content") if kind == "parquet" else (text_field,)
    count = 0
    for item in read_records(path, fields):
        if item is None:
            continue
        if isinstance(item, Bad):
            raise TinyLlamaError(f"{path}:{item.line}: {item.reason}")
        yield item.text
        count += 1
        if limit is not None and count >= limit:
            return


def perplexity_of_tokens(scorer: Scorer, docs_tokens: list[list[int]], window: Optional[int] = None) -> dict:
    """Token lists (no BOS) -> {'nll', 'tokens', 'windows', 'ppl'} with the model's context as the window."""
    window = int(window or scorer.max_length)
    if window > scorer.max_length:
        raise TinyLlamaError(f"window {window} exceeds the model's context of {scorer.max_length}")
    reqs = [ScoredRequest(c, x) for toks in docs_tokens for c, x in rolling_windows(toks, scorer.tokenizer.bos_id, window)]
    lls = scorer.score_tokens(reqs)
    nll = -sum(ll for ll, _ in lls)
    n = sum(len(t) for t in docs_tokens)
    if n == 0:
        raise TinyLlamaError("no tokens to score (empty documents)")
    return {"nll": nll, "tokens": n, "windows": len(reqs), "ppl": math.exp(nll / n)}


def perplexity_of_texts(scorer: Scorer, texts: list[str], window: Optional[int] = None) -> dict:
    toks = scorer.tokenizer.encode_batch(list(texts), bos=False)
    out = perplexity_of_tokens(scorer, toks, window)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    out["documents"] = len(texts)
    out["bytes"] = n_bytes
    out["bits_per_byte"] = out["nll"] / n_bytes / math.log(2) if n_bytes else float("nan")
    return out
