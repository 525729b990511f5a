"""`prepare`: raw corpora -> a dataset directory of packed token shards + manifest.json.

Work is split into units, one per input file (sorted, so unit numbers are stable). A unit writes its
shards (`train-u00003-00000.bin`, ...) and then, atomically, its record `.units/u00003.json`; re-running
skips units that have a record, so a killed run resumes where it stopped and gives byte-identical
output. `manifest.json` is rebuilt from all unit records at the end. `shard_index/num_shards` give
each machine the units u with u % num_shards == shard_index (same output directory on a shared disk,
or separate directories; a final run over all inputs then only writes the full manifest).

Each document is stored as its ids + </s> (TinyLlama's convention) and never split across shards;
a document goes to the validation split when a hash of (file name, line) falls below val_fraction,
so the split is by document, deterministic, and independent of the number of workers.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import queue
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tinyllama.checks import FRACTION, POSITIVE_INT, check_number
from tinyllama.data.readers import DEFAULT_FIELDS, SUFFIXES, Bad, Record, input_kind, parse_filters, read_records
from tinyllama.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, token_dtype, write_shard
from tinyllama.errors import TinyLlamaError

UNITS_DIR = ".units"
DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens = 128 MiB of uint16 per shard
_BATCH_DOCS, _BATCH_CHARS = 1024, 4 << 20  # per encode_batch call (progress granularity)
_MAX_EXAMPLES = 5


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> sorted unique input files."""
    found: list[Path] = []
    for item in inputs:
        s = str(item)
        if any(c in s for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(s, recursive=True)) if Path(m).is_file()]
            matches = [m for m in matches if input_kind(m)]
            if not matches:
                raise TinyLlamaError(f"{s}: the pattern matches no input files ({', '.join(SUFFIXES)})")
            found.extend(matches)
        elif Path(s).is_dir():
            matches = sorted(p for p in Path(s).rglob("*") if p.is_file() and input_kind(p))
            if not matches:
                raise TinyLlamaError(f"{s}: directory holds no input files ({', '.join(SUFFIXES)})")
            found.extend(matches)
        elif Path(s).is_file():
            if input_kind(Path(s)) is None:
                raise TinyLlamaError(f"{s}: unsupported input type; use one of {', '.join(SUFFIXES)}")
            found.append(Path(s))
        else:
            raise TinyLlamaError(f"{s}: input file not found")
    out, seen = [], set()
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return sorted(out)


def is_val(file_name: str, line: int, val_fraction: float) -> bool:
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{file_name}:{line}".encode(), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _SplitWriter:
    """Collects whole documents and writes a shard whenever shard_tokens are reached (last one partial)."""

    def __init__(self, out: Path, split: str, unit: int, dtype: str, shard_tokens: int) -> None:
        self.out, self.split, self.unit, self.dtype, self.limit = out, split, unit, dtype, shard_tokens
        self.docs: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.docs.append(ids)
        self.pending += len(ids)
        if self.pending >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        tokens = np.concatenate(self.docs)
        ends = np.cumsum([len(d) for d in self.docs], dtype=np.uint64)
        name = f"{self.split}-u{self.unit:05d}-{len(self.shards):05d}.bin"
        sha = write_shard(self.out / name, tokens, ends, self.dtype)
        self.shards.append({"file": name, "tokens": int(len(tokens)), "documents": int(len(ends)), "sha256": sha})
        self.docs, self.pending = [], 0
        _test_kill_hook()


_shards_written = 0


def _test_kill_hook() -> None:
    # Tests simulate `kill -9` right after the N-th shard lands, to prove restarts give identical output.
    global _shards_written
    _shards_written += 1
    limit = os.environ.get("TINYLLAMA_TEST_KILL_AFTER_SHARDS")
    if limit and _shards_written >= int(limit):
        os._exit(137)


def fast_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoder giving exactly `tokenizer.encode_batch`, faster for the Llama 2 tokenizer.

    Llama 2's tokenizer.json has no pre-tokenizer, so BPE runs over each whole document as one "word"
    and its word cache never helps. No Llama 2 token contains "▁" after another character (checked
    below on the actual vocabulary), so no merge can cross such a position: splitting the normalised
    text there (SentencePiece's own whitespace split) cannot change the result, and lets BPE cache words.
    Any other tokenizer gets its plain encode_batch.
    """
    import json as _json

    plain = tokenizer.encode_batch
    hf = getattr(tokenizer, "_hf", None)
    if hf is None:
        return plain
    spec = _json.loads(hf.to_str())
    norm = spec.get("normalizer") or {}
    steps = [n.get("type") for n in norm.get("normalizers", [])] if norm.get("type") == "Sequence" else []
    vocab = spec.get("model", {}).get("vocab", {})
    if (spec.get("pre_tokenizer") is not None or steps != ["Prepend", "Replace"] or spec["model"].get("type") != "BPE"
            or not isinstance(vocab, dict) or any("\u2581" in t.lstrip("\u2581") for t in vocab)):
        return plain
    from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers

    split = HFTokenizer.from_str(hf.to_str())
    split.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in split.encode_batch_fast(texts, add_special_tokens=False)]

    return encode


# ---- one unit (runs in a worker process or in-process) -------------------------------------------
_worker: dict = {}
_encoders: dict = {}


def _cached_encoder(tokenizer, fingerprint: str):
    # Building the word-split encoder parses the tokenizer JSON: do it once per tokenizer per process.
    key = (str(tokenizer.source_path), fingerprint)
    if key not in _encoders:
        _encoders.clear()
        _encoders[key] = fast_encoder(tokenizer)
    return _encoders[key]


def _load_tokenizer(tokenizer):
    """A Tokenizer object, a path, or None (the shipped Llama 2 tokenizer; loaded once per process)."""
    from tinyllama.tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    key = str(Path(tokenizer).resolve()) if tokenizer is not None else None
    if _tokenizers.get("key", 0) != key:
        _tokenizers.update(key=key, tok=Tokenizer(tokenizer))
    return _tokenizers["tok"]


_tokenizers: dict = {}
_fingerprints: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tok) -> str:
    """tok.fingerprint(), computed once per tokenizer object (it serialises the whole vocabulary)."""
    fp = _fingerprints.get(tok)
    if fp is None:
        fp = _fingerprints[tok] = tok.fingerprint()
    return fp


def _init_worker(tokenizer_path, progress_queue) -> None:
    # Each worker keeps tokenizers' own thread pool at full width: when one big file is left, its worker
    # still uses every core; with several busy workers the oversubscription costs little.
    from tinyllama.tokenizer import Tokenizer

    _worker["tokenizer"] = Tokenizer(tokenizer_path)
    _worker["queue"] = progress_queue


def _run_unit(job: dict) -> dict:
    q = _worker.get("queue")
    report = (lambda b, d, t: q.put((b, d, t))) if q is not None else job.pop("report", None)
    return process_unit(job, _worker["tokenizer"], report)


def process_unit(job: dict, tokenizer, report: Optional[Callable[[int, int, int], None]] = None) -> dict:
    path, out, unit, s = Path(job["input"]), Path(job["output"]), job["unit"], job["settings"]
    if tokenizer_fingerprint(tokenizer) != s["tokenizer"]:
        raise TinyLlamaError(f"{tokenizer.source_path}: tokenizer in this process differs from the one the run started with")
    # Leftovers of a killed earlier attempt at this unit (only this unit's: other machines may be
    # writing other units into the same directory right now).
    for old in [*out.glob(f"*-u{unit:05d}-*.bin"), *out.glob(f".*-u{unit:05d}-*.tmp-*"),
                *(out / UNITS_DIR).glob(f".u{unit:05d}.json.tmp-*")]:
        old.unlink(missing_ok=True)
    writers = {sp: _SplitWriter(out, sp, unit, s["dtype"], s["shard_tokens"]) for sp in ("train", "val")}
    fields = [s["field"]] if s["field"] else list(DEFAULT_FIELDS)
    filters = parse_filters(s["filters"])
    eos = tokenizer.eos_id
    encode = _cached_encoder(tokenizer, s["tokenizer"])
    skipped, examples, filtered = 0, [], 0
    batch: list[Record] = []
    chars = 0
    pending_bytes = [0]

    def progress(nbytes: int) -> None:
        pending_bytes[0] += nbytes

    def flush_batch() -> None:
        nonlocal batch, chars
        if not batch:
            return
        ids = encode([r.text for r in batch])
        ntok = 0
        for r, doc in zip(batch, ids):
            arr = np.empty(len(doc) + 1, dtype=np.int64)
            arr[:-1] = doc
            arr[-1] = eos
            writers["val" if is_val(path.name, r.line, s["val_fraction"]) else "train"].add(arr)
            ntok += len(arr)
        if report:
            report(pending_bytes[0], len(batch), ntok)
            pending_bytes[0] = 0
        batch, chars = [], 0

    for item in read_records(path, fields, filters, progress):
        if item is None:
            filtered += 1
            continue
        if isinstance(item, Bad):
            where = f"{path}:{'row ' if path.suffix == '.parquet' else 'line '}{item.line}"
            if not job.get("skip_bad"):
                hint = "" if item.fatal else "; fix it or pass --skip-bad to skip bad records"
                raise TinyLlamaError(f"{where}: {item.reason}{hint}")
            skipped += 1
            if len(examples) < _MAX_EXAMPLES:
                examples.append(f"{where}: {item.reason}")
            if item.fatal:
                break
            continue
        batch.append(item)
        chars += len(item.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            flush_batch()
    flush_batch()
    if report and pending_bytes[0]:
        report(pending_bytes[0], 0, 0)
    for w in writers.values():
        w.flush()
    record = {
        "unit": unit,
        "input": str(path),
        "input_name": path.name,
        "input_bytes": path.stat().st_size,
        "settings": s,
        "skipped": skipped,
        "skipped_examples": examples,
        "filtered": filtered,
        "splits": {sp: w.shards for sp, w in writers.items()},
    }
    _write_json_atomic(out / UNITS_DIR / f"u{unit:05d}.json", record)
    return record


# ---- the whole run --------------------------------------------------------------------------------
def prepare(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, name: Optional[str] = None,
            field: Optional[str] = None, val_fraction: float = DEFAULT_VAL_FRACTION, workers: int = 1,
            skip_bad: bool = False, filters: Sequence[str] = (), shard_index: int = 0, num_shards: int = 1,
            tokenizer=None, shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = False) -> dict:
    """Tokenize `inputs` into `output`; returns the manifest (also written to output/manifest.json)."""
    check_number(val_fraction, "--val-fraction", **FRACTION)
    check_number(workers, "--workers", **POSITIVE_INT)
    check_number(shard_tokens, "--shard-tokens", **POSITIVE_INT)
    check_number(num_shards, "--num-shards", **POSITIVE_INT)
    check_number(shard_index, f"--shard-index (with --num-shards {num_shards})", integer=True, lo=0, hi=num_shards - 1)
    parse_filters(filters)
    out_resolved = Path(output).resolve()
    # An output directory inside an input directory must not be read back as input (manifest.json).
    files = [f for f in expand_inputs(inputs) if out_resolved not in f.parents]
    if not files:
        raise TinyLlamaError(f"{', '.join(map(str, inputs))}: no input files outside the output directory {output}")
    tok = _load_tokenizer(tokenizer)
    tokenizer_path = str(tok.source_path) if tok.source_path else None
    out = Path(output)
    (out / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {
        "tokenizer": tokenizer_fingerprint(tok),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "field": field,
        "filters": list(filters),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "dtype": token_dtype(tok.vocab_size),
        "format_version": FORMAT_VERSION,
    }
    jobs, done = [], {}
    for unit, path in enumerate(files):
        rec_path = out / UNITS_DIR / f"u{unit:05d}.json"
        if rec_path.exists():
            rec = json.loads(rec_path.read_text())
            if rec.get("input_name") != path.name or rec.get("settings") != settings:
                what = "input list" if rec.get("input_name") != path.name else "settings"
                raise TinyLlamaError(
                    f"{out}: was prepared with a different {what} (unit {unit} is {rec.get('input_name')}); "
                    "use a new --output directory or delete this one"
                )
            if rec.get("input_bytes") != path.stat().st_size:
                raise TinyLlamaError(f"{path}: changed since it was prepared into {out}; use a new --output directory")
            done[unit] = rec
        elif unit % num_shards == shard_index:
            jobs.append({"unit": unit, "input": str(path), "output": str(out), "settings": settings, "skip_bad": skip_bad})

    t0 = time.time()
    totals = {"bytes": 0, "docs": 0, "tokens": 0}
    bar = _progress_bar(sum(Path(j["input"]).stat().st_size for j in jobs), progress and bool(jobs))

    def report(b: int, d: int, t: int) -> None:
        totals["bytes"] += b
        totals["docs"] += d
        totals["tokens"] += t
        if bar is not None:
            dt = max(time.time() - t0, 1e-6)
            bar.update(b)
            bar.set_postfix(docs=totals["docs"], tokens=totals["tokens"], tok_s=f"{totals['tokens'] / dt:,.0f}", refresh=False)

    jobs.sort(key=lambda j: -Path(j["input"]).stat().st_size)  # big files first: better load balance
    try:
        if workers == 1 or len(jobs) <= 1:
            _worker["tokenizer"], _worker["queue"] = tok, None
            for j in jobs:
                rec = process_unit(j, tok, report)
                done[rec["unit"]] = rec
        else:
            _run_pool(jobs, tokenizer_path, min(workers, len(jobs)), report, done)
    finally:
        if bar is not None:
            bar.close()
    manifest = build_manifest(out, name or out.resolve().name, files, done, settings)
    manifest_stats = {"seconds": time.time() - t0, **totals}
    _write_json_atomic(out / MANIFEST, manifest)
    manifest["run"] = manifest_stats  # this run's throughput (not written: the manifest stays deterministic)
    return manifest


def _run_pool(jobs, tokenizer_path, workers, report, done) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")  # tokenizers' Rust threads do not survive fork
    q = ctx.Queue()

    def drain() -> None:
        try:
            while True:
                report(*q.get_nowait())
        except queue.Empty:
            pass

    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer_path, q))
    ok = False
    try:
        pending = {ex.submit(_run_unit, j): j for j in jobs}
        while pending:
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for fut in finished:
                job = pending.pop(fut)
                try:
                    rec = fut.result()  # re-raises a worker's TinyLlamaError here
                except BrokenProcessPool:
                    raise TinyLlamaError(
                        f"{job['input']}: a prepare worker process died (out of memory? killed?); finished inputs are "
                        "kept, re-run the same command to continue"
                    ) from None
                done[rec["unit"]] = rec
        drain()
        ok = True
    finally:
        if not ok:  # stop the other workers now: their unfinished units leave no record and are redone later
            for proc in list(getattr(ex, "_processes", {}).values()):
                proc.terminate()
        ex.shutdown(wait=True, cancel_futures=True)


def build_manifest(out: Path, name: str, files: list[Path], done: dict, settings: dict) -> dict:
    splits = {}
    for sp in ("train", "val"):
        shards = [sh for u in sorted(done) for sh in done[u]["splits"][sp]]
        splits[sp] = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                      "shards": shards}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "tokenizer": {"fingerprint": settings["tokenizer"], "vocab_size": settings["vocab_size"],
                      "eos_id": settings["eos_id"]},
        "dtype": settings["dtype"],
        "settings": settings,
        "complete": len(done) == len(files),
        "inputs": [
            {"unit": u, "file": done[u]["input_name"], "bytes": done[u]["input_bytes"],
             "documents": sum(s["documents"] for sp in done[u]["splits"].values() for s in sp),
             "tokens": sum(s["tokens"] for sp in done[u]["splits"].values() for s in sp),
             "skipped": done[u]["skipped"], "skipped_examples": done[u]["skipped_examples"], "filtered": done[u]["filtered"]}
            for u in sorted(done)
        ],
        "pending_inputs": [p.name for u, p in enumerate(files) if u not in done],
        "splits": splits,
    }


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def write_token_dataset(output: str | os.PathLike, splits: dict[str, Sequence[Sequence[int]]], *, name: Optional[str] = None,
                        vocab_size: int = 32000, tokenizer_fingerprint: str = "pretokenized",
                        shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Write already-tokenized documents ({"train": [ids, ...], "val": [...]}) as a dataset directory.

    Ids are stored as given (append </s> yourself if wanted). Used for pre-tokenized data and by tests."""
    out = Path(output)
    (out / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {"tokenizer": tokenizer_fingerprint, "vocab_size": vocab_size, "eos_id": None, "field": None,
                "filters": [], "val_fraction": None, "shard_tokens": shard_tokens, "dtype": token_dtype(vocab_size),
                "format_version": FORMAT_VERSION}
    rec = {"unit": 0, "input_name": "<tokens>", "input_bytes": 0, "skipped": 0, "skipped_examples": [], "filtered": 0,
           "splits": {}}
    for sp in ("train", "val"):
        w = _SplitWriter(out, sp, 0, settings["dtype"], shard_tokens)
        for doc in splits.get(sp, ()):
            arr = np.asarray(doc, dtype=np.int64)
            if len(arr) and (arr.min() < 0 or arr.max() >= vocab_size):
                raise TinyLlamaError(f"{out}: token ids must be in [0, {vocab_size})")
            w.add(arr)
        w.flush()
        rec["splits"][sp] = w.shards
    manifest = build_manifest(out, name or out.resolve().name, [Path("<tokens>")], {0: rec}, settings)
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest
