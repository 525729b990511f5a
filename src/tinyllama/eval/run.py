"""Evaluation runs: multiple-choice tasks and perplexity for a model, as a results dict (`tinyllama eval`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tinyllama.checks import POSITIVE_INT, check_device, check_fields
from tinyllama.errors import TinyLlamaError


@dataclass
class EvalConfig:
    model: Optional[str] = None
    random_preset: Optional[str] = None
    tasks: list[str] = field(default_factory=list)  # "name[:shots]=path"
    perplexity: list[str] = field(default_factory=list)  # text files or prepared dataset directories
    split: str = "val"  # prepared-dataset split for perplexity
    text_field: str = "text"
    window: Optional[int] = None  # perplexity window (default: the model's context)
    limit: Optional[int] = None  # first N items / documents per task (a quick look, not a result)
    batch_size: int = 16
    device: Optional[str] = None
    dtype: Optional[str] = None
    output: Optional[str] = None


    def validate(self) -> None:
        from tinyllama.convert.hf import parse_dtype

        check_fields(self, "{}", as_flags=True, batch_size=POSITIVE_INT, window=dict(integer=True, lo=2, none_ok=True),
                     limit=dict(POSITIVE_INT, none_ok=True))
        check_device(self.device)
        parse_dtype(self.dtype)


def parse_task_spec(spec: str) -> tuple[str, int, str]:
    from tinyllama.eval.tasks import TASKS

    if "=" not in spec:
        raise TinyLlamaError(f"task '{spec}': expected NAME=PATH (e.g. hellaswag=hellaswag_val.jsonl)")
    name, path = spec.split("=", 1)
    shots = 0
    if ":" in name:
        name, s = name.split(":", 1)
        if not s.isdigit():
            raise TinyLlamaError(f"task '{spec}': few-shot count after ':' must be a number, got {s!r}")
        shots = int(s)
    if name not in TASKS:
        raise TinyLlamaError(f"task '{spec}': unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    if shots and name != "mmlu":
        raise TinyLlamaError(f"task '{spec}': few-shot is supported for mmlu only (the others are reported 0-shot)")
    return name, shots, path


def _documents_for_perplexity(tokenizer, path: str, cfg: EvalConfig) -> tuple[list[list[int]], int]:
    """(token lists without BOS, UTF-8 byte count or 0 when unknown) for a file or prepared dataset."""
    from tinyllama.eval.perplexity import iter_documents

    p = Path(path)
    if not p.exists():  # TokenSource's "dataset not found" would not fit a missing text file
        from tinyllama.data.shards import datasets_near

        raise TinyLlamaError(f"{p}: no such text file or prepared dataset directory{datasets_near(p)}")
    if p.is_dir():
        from tinyllama.data.shards import TokenSource

        src = TokenSource(p, split=cfg.split)
        if src.num_tokens == 0:
            raise TinyLlamaError(f"{p}: split '{cfg.split}' has no tokens (use --split train or another split)")
        docs = []
        for d in src.documents():
            toks = [int(t) for t in d]
            if toks and toks[0] == tokenizer.bos_id:
                toks = toks[1:]
            docs.append(toks)
            if cfg.limit is not None and len(docs) >= cfg.limit:
                break
        return docs, 0
    texts = list(iter_documents(p, cfg.text_field, cfg.limit))
    return tokenizer.encode_batch(texts, bos=False), sum(len(t.encode("utf-8")) for t in texts)


def _finite(obj):
    """NaN (a standard error of one item) is not JSON: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str, obj: dict) -> None:
    from tinyllama.fileio import atomic_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp, open(tmp, "w") as f:
        json.dump(_finite(obj), f, indent=2)
        f.write("\n")


def evaluate(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    from tinyllama.eval.perplexity import perplexity_of_tokens
    from tinyllama.eval.scoring import Scorer
    from tinyllama.eval.tasks import evaluate_task, load_task

    cfg.validate()
    specs = [parse_task_spec(s) for s in cfg.tasks]  # check every spec before loading the model
    if model is None:
        from tinyllama.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.random_preset, cfg.device, cfg.dtype)
        if next(model.parameters()).device.type == "cpu":
            from tinyllama.host_allocator import keep_freed_host_memory

            keep_freed_host_memory()  # after the load, so its temporaries are still given back (host_allocator.py)
    scorer = Scorer(model, tokenizer, batch_size=cfg.batch_size)
    results: dict = {"model": cfg.model or f"random:{cfg.random_preset}", "config": asdict(cfg), "tasks": {},
                     "perplexity": {}}
    for name, shots, path in specs:
        t0 = time.perf_counter()
        items = load_task(name, path, num_fewshot=shots)
        if cfg.limit is not None:
            items = items[: cfg.limit]
        r = evaluate_task(scorer, items)
        label = f"{name}_{shots}shot" if name == "mmlu" else name
        r.pop("loglikelihoods")
        r.pop("per_item")
        r.update(path=str(path), num_fewshot=shots, seconds=round(time.perf_counter() - t0, 2))
        results["tasks"][label] = r
    for path in cfg.perplexity:
        t0 = time.perf_counter()
        docs, n_bytes = _documents_for_perplexity(tokenizer, path, cfg)
        r = perplexity_of_tokens(scorer, docs, cfg.window)
        r["documents"] = len(docs)
        r["bits_per_byte"] = r["nll"] / n_bytes / math.log(2) if n_bytes else None
        r["seconds"] = round(time.perf_counter() - t0, 2)
        results["perplexity"][str(path)] = r
    return results
