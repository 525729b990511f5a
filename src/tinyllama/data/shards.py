"""On-disk token shards: the packed format `tinyllama prepare` writes, and lit-gpt's `LITPKDS` format.

A tinyllama shard (`<split>-u<unit>-<k>.bin`) is one file, written to a temporary name and renamed
into place, so a reader never sees a half-written shard:

    32-byte header: magic b"TLTOKS\\x00\\x01" | dtype code u8 | 7 zero bytes | n_tokens u64 | n_docs u64
    n_tokens token ids (dtype: uint16 while the vocabulary fits, else uint32), zero-padded to 8 bytes
    n_docs uint64 end offsets: document d is tokens[ends[d-1]:ends[d]] and ends with </s>

The header counts must match the file size exactly; anything else is refused with the file named.
A dataset directory holds such shards plus `manifest.json` (see prepare.py), which lists the shards a
loader reads. `TokenSource` is the loader's view of one split: a virtual concatenation of memory-mapped
shards, read at any token offset in O(log shards).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from tinyllama.errors import TinyLlamaError

MAGIC = b"TLTOKS\x00\x01"
HEADER = struct.Struct("<8sB7xQQ")  # 32 bytes
MANIFEST = "manifest.json"
MAX_OPEN = 256
FORMAT = "tinyllama-packed-tokens"
FORMAT_VERSION = 1

# lit-gpt / TinyLlama packed_dataset.py: b"LITPKDS" + version u64 (=1) + dtype code u8 + chunk_size u64.
LIT_MAGIC = b"LITPKDS"
LIT_HEADER = struct.Struct("<7sQBQ")  # 24 bytes
# The dtype codes are lit-gpt's; tinyllama shards reuse them.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}
TOKEN_DTYPES = {"uint16": (np.uint16, 8), "uint32": (np.uint32, 9)}  # 9 is ours: lit-gpt has no uint32
_CODE_TO_DTYPE = {8: np.uint16, 9: np.uint32}


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_shard(path: Path, tokens: np.ndarray, doc_ends: np.ndarray, dtype: str) -> str:
    """Write one shard atomically (temp file, fsync, rename); returns its sha256."""
    np_dtype, code = TOKEN_DTYPES[dtype]
    tokens = np.ascontiguousarray(tokens, dtype=np_dtype)
    ends = np.ascontiguousarray(doc_ends, dtype=np.uint64)
    if len(ends) and int(ends[-1]) != len(tokens):
        raise ValueError("doc_ends must end at the number of tokens")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in (HEADER.pack(MAGIC, code, len(tokens), len(ends)), tokens.tobytes(),
                      b"\0" * (-tokens.nbytes % 8), ends.tobytes()):
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return h.hexdigest()


class Shard:
    """A memory-mapped shard (tinyllama or LITPKDS). Opens lazily and pickles without its maps."""

    def __init__(self, path: Path, *, expect_tokens: Optional[int] = None) -> None:
        self.path = Path(path)
        self._tokens: Optional[np.ndarray] = None
        self._ends: Optional[np.ndarray] = None
        self.num_tokens, self.num_docs, self._layout = self._read_header()
        if expect_tokens is not None and expect_tokens != self.num_tokens:
            raise TinyLlamaError(
                f"{self.path}: holds {self.num_tokens} tokens but the manifest says {expect_tokens}; "
                "the dataset is inconsistent, re-run `tinyllama prepare` into a new directory"
            )

    def _read_header(self):
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER.size)
        except FileNotFoundError:
            raise TinyLlamaError(f"{self.path}: shard listed in the manifest is missing; re-run `tinyllama prepare`") from None
        if head.startswith(LIT_MAGIC):
            if len(head) < LIT_HEADER.size:
                raise TinyLlamaError(f"{self.path}: truncated LITPKDS header")
            _, version, code, chunk_size = LIT_HEADER.unpack(head[: LIT_HEADER.size])
            if version != 1 or code not in DTYPE_CODES:
                raise TinyLlamaError(f"{self.path}: unsupported LITPKDS version {version} or dtype code {code}")
            dtype = np.dtype(DTYPE_CODES[code])
            if dtype.kind not in "iu":
                raise TinyLlamaError(f"{self.path}: LITPKDS dtype {dtype} is not an integer token type")
            n = (size - LIT_HEADER.size) // dtype.itemsize
            if n < chunk_size:
                raise TinyLlamaError(f"{self.path}: LITPKDS file holds {n} tokens, header says chunk_size {chunk_size} (truncated?)")
            return int(chunk_size), 0, (dtype, LIT_HEADER.size, None)
        if len(head) < HEADER.size or not head.startswith(MAGIC):
            raise TinyLlamaError(f"{self.path}: not a tinyllama token shard or LITPKDS file (bad magic)")
        _, code, n_tok, n_docs = HEADER.unpack(head)
        if code not in _CODE_TO_DTYPE:
            raise TinyLlamaError(f"{self.path}: unknown token dtype code {code}")
        dtype = np.dtype(_CODE_TO_DTYPE[code])
        tok_bytes = n_tok * dtype.itemsize
        ends_off = HEADER.size + tok_bytes + (-tok_bytes % 8)
        if size != ends_off + 8 * n_docs:
            raise TinyLlamaError(
                f"{self.path}: file is {size} bytes but its header describes {ends_off + 8 * n_docs}; "
                "the shard is damaged, re-run `tinyllama prepare` into a new directory"
            )
        return int(n_tok), int(n_docs), (dtype, HEADER.size, ends_off)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            dtype, off, _ = self._layout
            self._tokens = np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=(self.num_tokens,))
        return self._tokens

    @property
    def doc_ends(self) -> np.ndarray:
        """Document end offsets (tinyllama shards); LITPKDS files have none (empty array)."""
        if self._ends is None:
            _, _, ends_off = self._layout
            if ends_off is None or self.num_docs == 0:
                self._ends = np.zeros(0, dtype=np.uint64)
            else:
                self._ends = np.memmap(self.path, dtype=np.uint64, mode="r", offset=ends_off, shape=(self.num_docs,))
        return self._ends

    def release(self) -> None:
        """Drop the memory maps (each holds a file descriptor); they reopen on next use."""
        self._tokens = self._ends = None

    def documents(self) -> Iterator[np.ndarray]:
        start = 0
        for end in self.doc_ends:
            yield np.asarray(self.tokens[start:int(end)])
            start = int(end)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tokens"] = d["_ends"] = None
        return d


def is_litpkds(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LIT_MAGIC)) == LIT_MAGIC
    except OSError:
        return False


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise TinyLlamaError(
            f"{directory}: no {MANIFEST}; not a prepared dataset (run `tinyllama prepare INPUT... --output {directory}`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyLlamaError(f"{path}: not valid JSON ({e}); re-run `tinyllama prepare`") from None
    if m.get("format") != FORMAT:
        raise TinyLlamaError(f"{path}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version", 0) > FORMAT_VERSION:
        raise TinyLlamaError(f"{path}: format version {m.get('version')} is newer than this tinyllama reads ({FORMAT_VERSION})")
    return m


def datasets_near(path: Path) -> str:
    """A hint for a path that is not a dataset, naming the prepared datasets it was probably meant for: those
    inside it (a folder of datasets) or, for a missing path, those whose folder names begin with its name
    (`tinyllama pretrain`'s demo data is `out/data/demo-<tokenizer fingerprint>/{prose,code}`, not
    `out/data/demo`). "" when there are none."""
    if path.is_dir():
        patterns, base = [f"*/{MANIFEST}"], path
    elif path.parent.is_dir() and path.name:
        stem = glob.escape(path.name)
        patterns, base = [f"{stem}-*/{MANIFEST}", f"{stem}-*/*/{MANIFEST}"], path.parent
    else:
        return ""
    near = sorted({m.parent for pattern in patterns for m in base.glob(pattern)})
    return f" (prepared datasets: {' '.join(map(str, near[:6]))})" if near else ""


class TokenSource:
    """One split of one dataset as a single virtual token array over memory-mapped shards.

    `path` is a prepared dataset directory (manifest.json), a directory of LITPKDS `.bin` files,
    or a single LITPKDS file. LITPKDS data has no train/val split: it is all "train".
    """

    def __init__(self, path: str | os.PathLike, split: str = "train") -> None:
        self.path = Path(path)
        self.split = split
        self.manifest: Optional[dict] = None
        if not self.path.exists():
            raise TinyLlamaError(f"{self.path}: dataset not found (prepare it with `tinyllama prepare ... --output "
                                 f"{self.path}`){datasets_near(self.path)}")
        if self.path.is_file() or not (self.path / MANIFEST).exists():
            files = [self.path] if self.path.is_file() else sorted(p for p in self.path.glob("*.bin"))
            if not files or not all(is_litpkds(p) for p in files):
                raise TinyLlamaError(
                    f"{self.path}: neither a prepared dataset (no {MANIFEST}) nor LITPKDS .bin file(s)"
                    f"{datasets_near(self.path)}"
                )
            self.name = self.path.stem if self.path.is_file() else self.path.name
            self.shards = [Shard(p) for p in files] if split == "train" else []
            self.tokenizer_fingerprint = None
        else:
            m = self.manifest = read_manifest(self.path)
            self.name = m.get("name") or self.path.name
            entries = m.get("splits", {}).get(split, {}).get("shards", [])
            self.shards = [Shard(self.path / e["file"], expect_tokens=e["tokens"]) for e in entries]
            self.tokenizer_fingerprint = m.get("tokenizer", {}).get("fingerprint")
            if not m.get("complete", True):
                warnings.warn(
                    f"{self.path}: dataset is incomplete (inputs not yet prepared: {m.get('pending_inputs', [])[:3]}...); "
                    "finish the other --shard-index runs, then re-run `tinyllama prepare` over all inputs",
                    stacklevel=2,
                )
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_docs = sum(s.num_docs for s in self.shards)
        self._open: dict[int, None] = {}  # insertion-ordered LRU of shards with live maps

    def _touch(self, i: int) -> Shard:
        # Corpora at TinyLlama scale have ~10^5 shards: keep at most MAX_OPEN maps (file descriptors) live.
        if i in self._open:
            del self._open[i]
        elif len(self._open) >= MAX_OPEN:
            oldest = next(iter(self._open))
            del self._open[oldest]
            self.shards[oldest].release()
        self._open[i] = None
        return self.shards[i]

    def read(self, start: int, length: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated split as int64."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"{self.path}: tokens [{start}, {start + length}) out of range {self.num_tokens}")
        out = np.empty(length, dtype=np.int64) if out is None else out
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            shard = self._touch(i)
            lo = start + done - int(self.starts[i])
            n = min(length - done, shard.num_tokens - lo)
            out[done:done + n] = shard.tokens[lo:lo + n]
            done += n
            i += 1
        return out

    def documents(self) -> Iterator[np.ndarray]:
        for i in range(len(self.shards)):
            yield from self._touch(i).documents()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_open"] = {}
        return d
