"""Perplexity over documents with disjoint rolling windows: every token is scored exactly once.

A document's first token is conditioned on BOS; each later window predicts up to `window` new tokens
from as many preceding tokens as fit (see `scoring.rolling_windows`). Reports token perplexity
exp(NLL / tokens) and bits per UTF-8 byte, which compares across tokenizers.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Iterator, Optional

from tinyllama.errors import TinyLlamaError
from tinyllama.eval.scoring import Scorer, ScoredRequest, rolling_windows


def iter_documents(path: Path, text_field: str = "text", limit: Optional[int] = None) -> Iterator[str]:
    """Texts from .txt (the whole file is one document), .jsonl/.jsonl.zst (field `text_field`) or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise TinyLlamaError(f"{path}: text file not found")
    name = path.name
    count = 0

    def done() -> bool:
        return limit is not None and count >= limit

    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = text_field if text_field in table.column_names else ("content" if "content" in table.column_names else None)
        if col is None:
            raise TinyLlamaError(f"{path}: no column '{text_field}' (columns: {table.column_names})")
        for t in table.column(col).to_pylist():
            if done():
                return
            count += 1
            yield t
        return
    if name.endswith((".jsonl", ".jsonl.zst", ".json")):
        raw = open(path, "rb")
        if name.endswith(".zst"):
            import zstandard

            stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        else:
            stream = io.TextIOWrapper(raw, encoding="utf-8")
        with stream:
            for lineno, line in enumerate(stream, 1):
                if done():
                    return
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TinyLlamaError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
                    raise TinyLlamaError(f"{path}:{lineno}: missing string field '{text_field}'")
                count += 1
                yield doc[text_field]
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TinyLlamaError(f"{path}: not UTF-8 text (give .txt, .jsonl, .jsonl.zst or .parquet)") from None


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
