"""Tuned kernel choices kept on disk from one process to the next.

Why: the Triton decode step times its candidates on its first call (each product's tile, the attention, the
whole step): ~140 s at 32 rows on an H200, ~35 s at one row (perf/NOTES.md, twenty-first session). `tinyllama
serve` warms up every decode bucket at start, so each restart paid that again for each bucket. The choices
depend only on the card and the shapes (in each key) and on the code (Triton, torch, this package and the
candidate lists: the fingerprint), so they are kept per fingerprint in one file:
$TINYLLAMA_TUNING_CACHE if set ("off": none kept), else $XDG_CACHE_HOME/tinyllama/<name> (~/.cache/...).

The file is written under a temporary name and renamed (never half-written), merged with what other processes
wrote since it was read; an unreadable file is tuned past with a one-line warning. It is read with an
unpickler that builds only the types a tuning holds, so a file from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

from tinyllama.fileio import atomic_file

ENV = "TINYLLAMA_TUNING_CACHE"
OFF = ("off", "none", "0", "")
KEEP_FINGERPRINTS = 8  # older code's entries beyond these are dropped when the file is written


class _TuningUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: frozenset) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a type a tuning holds")
        return super().find_class(module, name)


class TuningStore:
    """Tables of tuned choices ({key: choice} dicts, by name) kept per fingerprint in one file. `restore`
    fills the tables from the file once per process (unless `read` is off: the bench times every candidate
    afresh); `persist` writes them back. `allowed`: the (module, name) of every class the tables hold."""

    def __init__(self, filename: str, fingerprint: Callable[[], str], allowed: Iterable[tuple[str, str]]) -> None:
        self.filename = filename
        self._fingerprint = fingerprint
        self.allowed = frozenset(allowed)
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
        return self._fingerprint()

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # once per process for each cause
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def _load(self, path: Path) -> dict:
        """{fingerprint: {table name: {key: choice}}} from the file; {} if there is none or it is unreadable."""
        try:
            with open(path, "rb") as f:
                data = _TuningUnpickler(f, self.allowed).load()
        except (FileNotFoundError, NotADirectoryError):  # none yet (or its folder cannot exist: writing says so)
            return {}
        except Exception as e:  # noqa: BLE001 - truncated, foreign, from another version: tune afresh
            self._warn(f"{path}: not a readable tuning cache ({type(e).__name__}: {e}); tuning afresh "
                       f"(delete the file, or set {ENV}=off)")
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            self._warn(f"{path}: not a tuning cache (unexpected contents); tuning afresh (delete the file, or set "
                       f"{ENV}=off)")
            return {}
        return data

    def restore(self, tables: dict[str, dict]) -> int:
        """Once per process: each table gets the file's choices under this fingerprint that it lacks. Returns
        how many it got."""
        if self._restored or not self.read:
            return 0
        self._restored = True
        path = self.path()
        if path is None:
            return 0
        kept = self._load(path).get(self.fingerprint(), {})
        added = 0
        for name, table in tables.items():
            for key, choice in kept.get(name, {}).items() if isinstance(kept.get(name), dict) else ():
                if key not in table:
                    table[key] = choice
                    added += 1
        return added

    def persist(self, tables: dict[str, dict]) -> None:
        """Write the tables under this fingerprint, merged with the file as it is now (other processes' choices
        stay; this process's win where both have a key). Only the KEEP_FINGERPRINTS latest fingerprints stay."""
        path = self.path()
        if path is None:
            return
        try:
            data = self._load(path)
            fingerprint = self.fingerprint()
            mine = data.pop(fingerprint, {})  # re-inserted last: the latest fingerprint is kept longest
            for name, table in tables.items():
                mine.setdefault(name, {}).update(table)
            data[fingerprint] = mine
            for old in list(data)[:-KEEP_FINGERPRINTS]:
                del data[old]
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as f:
                    pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:  # unwritable place, unpicklable choice
            self._warn(f"{path}: could not keep the tuned kernel choices ({type(e).__name__}: {e}); the next "
                       f"process tunes again (set {ENV} to a writable file, or to off)")
