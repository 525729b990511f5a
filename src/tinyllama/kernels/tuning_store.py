"""Tuned kernel choices kept on disk from one process to the next.

Why: the Triton decode step times its candidates on its first call (each product's tile, the attention, the
whole step): ~140 s at 32 rows on an H200, ~35 s at one row (perf/NOTES.md, twenty-first session). `tinyllama
serve` warms up every decode bucket at start, so each restart paid that again for each bucket. The choices
depend only on the card and the shapes (in each key) and on the code (Triton, torch, this package's kernels
and candidate lists: the fingerprint), so they are kept per fingerprint in one JSON file:
$TINYLLAMA_TUNING_CACHE if set ("off": none kept), else $XDG_CACHE_HOME/tinyllama/<name> (~/.cache/...).

Keys and choices are plain data: tuples, dicts, numbers, strings, torch dtypes and the registered config classes
(dataclasses or named tuples, rebuilt through their constructors), so reading a file runs no code and can only
make those. The file is written under a temporary name and renamed (never half-written), under a lock, merged
with what other processes wrote; a file that cannot be read, or written, costs a re-tuning and one warning,
never the process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from tinyllama.fileio import atomic_file

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writes are still atomic, merges may race
    fcntl = None

ENV = "TINYLLAMA_TUNING_CACHE"
OFF = ("off", "none", "0", "")
KEEP_FINGERPRINTS = 8  # older code's entries beyond these are dropped when the file is written
FORMAT = 1
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class TuningCodec:
    """Plain data <-> JSON, with the config classes `types` (dataclasses or named tuples) by name."""

    def __init__(self, types: Iterable[type]) -> None:
        self.types = {t.__name__: t for t in types}

    def encode(self, value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.dtype):
            name = str(value).removeprefix("torch.")
            if name in DTYPES:
                return {"dtype": name}
        elif type(value).__name__ in self.types and type(value) is self.types[type(value).__name__]:
            fields = value._asdict() if isinstance(value, tuple) else {
                f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return {"config": type(value).__name__, "fields": {k: self.encode(v) for k, v in fields.items()}}
        elif isinstance(value, tuple):
            return {"tuple": [self.encode(v) for v in value]}
        elif isinstance(value, dict):
            return {"pairs": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        raise TypeError(f"{type(value).__name__} is not a type a tuning holds")

    def decode(self, data):
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, dict) and len(data) == 1 and "tuple" in data and isinstance(data["tuple"], list):
            return tuple(self.decode(v) for v in data["tuple"])
        if isinstance(data, dict) and len(data) == 1 and "pairs" in data and isinstance(data["pairs"], list):
            return {self.decode(k): self.decode(v) for k, v in data["pairs"]}
        if isinstance(data, dict) and set(data) == {"dtype"} and data["dtype"] in DTYPES:
            return DTYPES[data["dtype"]]
        if isinstance(data, dict) and set(data) == {"config", "fields"} and data["config"] in self.types \
                and isinstance(data["fields"], dict):
            return self.types[data["config"]](**{k: self.decode(v) for k, v in data["fields"].items()})
        raise ValueError(f"not a tuning value: {str(data)[:80]}")


class TuningStore:
    """Tables of tuned choices ({key: choice} dicts, by name) kept per fingerprint in one file. `restore` fills
    the tables from the file once per process (unless `read` is off: the bench times every candidate afresh);
    `persist` writes them back. `types`: the config classes the tables hold. The fingerprint is taken once, at
    the first use: a process whose sources change while it runs keeps what it runs under the old one."""

    def __init__(self, filename: str, fingerprint: Callable[[], str], types: Iterable[type]) -> None:
        self.filename = filename
        self._fingerprint_of = fingerprint
        self._fingerprint: Optional[str] = None
        self.codec = TuningCodec(types)
        self.read = True
        self._restored = False
        self._warned: set[str] = set()

    def path(self) -> Optional[Path]:
        value = os.environ.get(ENV)
        if value is not None:
            return None if value.strip().lower() in OFF else Path(value).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "tinyllama" / self.filename

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._fingerprint_of()
        return self._fingerprint

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # once per process for each cause
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def _load(self, path: Path) -> dict:
        """{fingerprint: {table name: encoded pairs}} from the file; {} if there is none or it is unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # none yet (or its folder cannot exist: writing says so)
            return {}
        except (OSError, ValueError) as e:
            self._warn(f"{path}: not a readable tuning cache ({type(e).__name__}: {e}); tuning afresh "
                       f"(delete the file, or set {ENV}=off)")
            return {}
        if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("tunings"), dict)):
            self._warn(f"{path}: not a tuning cache of this version; tuning afresh (delete the file, or set {ENV}=off)")
            return {}
        return data["tunings"]

    def restore(self, tables: dict[str, dict]) -> int:
        """Once per process: each table gets the file's choices under this fingerprint that it lacks. Returns
        how many it got. Any failure is a warning and a re-tuning."""
        if self._restored or not self.read:
            return 0
        self._restored = True
        try:
            path = self.path()
            if path is None:
                return 0
            kept = self._load(path).get(self.fingerprint(), {})
            decoded = {name: [(self.codec.decode(k), self.codec.decode(v)) for k, v in kept.get(name, [])]
                       for name in tables}
        except Exception as e:  # noqa: BLE001 - a bad entry, no home folder, sources unreadable: tune afresh
            self._warn(f"tuning cache not used ({type(e).__name__}: {e}); tuning afresh (set {ENV}=off to stop "
                       "reading it)")
            return 0
        added = 0
        for name, table in tables.items():
            for key, choice in decoded[name]:
                if key not in table:
                    table[key] = choice
                    added += 1
        return added

    def persist(self, tables: dict[str, dict]) -> None:
        """Write the tables under this fingerprint, merged with the file as it is now (other processes' choices
        stay; this process's win where both have a key). Only the KEEP_FINGERPRINTS latest fingerprints stay.
        Any failure is a warning: the next process tunes again."""
        path = None
        try:
            path = self.path()
            if path is None:
                return
            encoded = {name: [[self.codec.encode(k), self.codec.encode(v)] for k, v in table.items()]
                       for name, table in tables.items()}
            fingerprint = self.fingerprint()
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                data = self._load(path)
                mine = {name: {json.dumps(k): [k, v] for k, v in pairs}
                        for name, pairs in data.pop(fingerprint, {}).items()}
                for name, pairs in encoded.items():
                    mine.setdefault(name, {}).update({json.dumps(k): [k, v] for k, v in pairs})
                data[fingerprint] = {name: list(by_key.values()) for name, by_key in mine.items()}  # latest last
                for old in list(data)[:-KEEP_FINGERPRINTS]:
                    del data[old]
                with atomic_file(path) as tmp:
                    tmp.write_text(json.dumps({"format": FORMAT, "tunings": data}), encoding="utf-8")
        except Exception as e:  # noqa: BLE001 - unwritable place, a choice of an unregistered type
            self._warn(f"{path or 'tuning cache'}: could not keep the tuned kernel choices ({type(e).__name__}: "
                       f"{e}); the next process tunes again (set {ENV} to a writable file, or to off)")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock for a read-merge-write of `path` (POSIX; elsewhere none)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
