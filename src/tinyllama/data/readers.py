"""Raw corpus readers: JSON lines (plain, .zst, .gz), parquet and plain text, with exact error locations.

Each reader yields `Record(line, text)` or `Bad(line, reason, fatal)`; `fatal` means the rest of the
file cannot be read (corrupt or truncated compression), otherwise only that record is bad.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from tinyllama.errors import TinyLlamaError, json_error_text

SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json", ".json.gz", ".json.zst", ".parquet", ".txt")
DEFAULT_FIELDS = ("text", "content")
_CHUNK = 1 << 20


@dataclass
class Record:
    line: int  # 1-based line (JSON lines), 0-based row (parquet), 1 for a .txt file
    text: str


@dataclass
class Bad:
    line: int
    reason: str
    fatal: bool = False


class _StreamError(Exception):
    pass


def read_jsonl_objects(path: Path, what: str = "data file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a plain JSON-lines file (task items, chat data)."""
    path = Path(path)
    if not path.is_file():
        raise TinyLlamaError(f"{path}: {what} not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TinyLlamaError(f"{path}:{lineno}: not valid JSON ({json_error_text(e, line=False)})") from None
            if not isinstance(obj, dict):
                raise TinyLlamaError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def input_kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    for suf in (".jsonl", ".json"):
        for comp in ("", ".zst", ".gz"):
            if name.endswith(suf + comp):
                return "jsonl" + comp
    return None


def parse_filters(filters: Optional[Sequence[Union[str, tuple]]]) -> list[tuple[list[str], str]]:
    """"meta.redpajama_set_name=RedPajamaGithub" -> drop records whose field equals that value."""
    out = []
    for f in filters or ():
        if isinstance(f, str):
            key, sep, value = f.partition("=")
            if not sep or not key:
                raise TinyLlamaError(f"filter {f!r}: expected FIELD.PATH=VALUE, e.g. meta.redpajama_set_name=RedPajamaGithub")
        else:
            key, value = f
        out.append((key.split("."), value))
    return out


def _dig(record, keys: list[str]):
    for k in keys:
        if not isinstance(record, dict) or k not in record:
            return None
        record = record[k]
    return record


def _dropped(record: dict, filters) -> bool:
    return any(str(_dig(record, keys)) == value for keys, value in filters if _dig(record, keys) is not None)


def _pick_text(obj, fields: Sequence[str]):
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    for f in fields:
        if f in obj:
            v = obj[f]
            if not isinstance(v, str):
                return None, f"field '{f}' is {type(v).__name__}, expected a string"
            return v, None
    return None, f"missing field {' / '.join(repr(f) for f in fields)} (keys: {sorted(obj)[:8]}); choose one with --field"


def _zstd_chunks(f) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    try:
        while True:
            raw = f.read(_CHUNK)
            if not raw:
                break
            while raw:
                if dobj.eof:  # concatenated frames
                    dobj, fed = dctx.decompressobj(), False
                fed = True
                out = dobj.decompress(raw)
                raw = dobj.unused_data if dobj.eof else b""
                if out:
                    yield out
    except zstandard.ZstdError as e:
        raise _StreamError(f"corrupt zstd data ({e})") from None
    if fed and not dobj.eof:
        raise _StreamError("truncated zstd data (the file ends inside a frame)")


def _gzip_chunks(f) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=f) as g:
            while True:
                out = g.read(_CHUNK)
                if not out:
                    return
                yield out
    except (OSError, EOFError, zlib.error) as e:
        raise _StreamError(f"corrupt or truncated gzip data ({e})") from None


def _plain_chunks(f) -> Iterator[bytes]:
    while True:
        out = f.read(_CHUNK)
        if not out:
            return
        yield out


def read_records(path: Path, fields: Sequence[str] = DEFAULT_FIELDS, filters=(),
                 progress: Optional[Callable[[int], None]] = None) -> Iterator[Union[Record, Bad, None]]:
    """Yield Record/Bad for each document of `path`, or None for a record dropped by a filter.

    `progress(n)` is called with compressed input bytes consumed (for the progress bar)."""
    kind = input_kind(path)
    if kind is None:
        raise TinyLlamaError(f"{path}: unsupported input type; use one of {', '.join(SUFFIXES)}")
    if kind == "parquet":
        yield from _read_parquet(path, fields, filters, progress)
        return
    with open(path, "rb") as f:
        chunks = {"jsonl": _plain_chunks, "txt": _plain_chunks, "jsonl.zst": _zstd_chunks, "jsonl.gz": _gzip_chunks}[kind](f)
        pos = 0

        def tick():
            nonlocal pos
            if progress is not None:
                now = f.tell()
                progress(now - pos)
                pos = now

        if kind == "txt":
            data = b"".join(chunks)
            tick()
            try:
                yield Record(1, data.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Bad(data.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}")
            return
        line_no, buf = 0, b""
        try:
            for chunk in chunks:
                lines = (buf + chunk).split(b"\n")
                buf = lines.pop()
                for raw in lines:
                    line_no += 1
                    yield _json_line(raw, line_no, fields, filters)
                tick()
        except _StreamError as e:
            tick()
            yield Bad(line_no + 1, str(e), fatal=True)
            return
        if buf:
            line_no += 1
            yield _json_line(buf, line_no, fields, filters)
        tick()


def _json_line(raw: bytes, line_no: int, fields, filters):
    if not raw.strip():
        return None
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Bad(line_no, f"invalid UTF-8 at byte {e.start} of the line")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return Bad(line_no, f"malformed JSON ({json_error_text(e, line=False)})")
    text, err = _pick_text(obj, fields)
    if err:
        return Bad(line_no, err)
    if filters and _dropped(obj, filters):
        return None
    return Record(line_no, text)


def _read_parquet(path: Path, fields, filters, progress) -> Iterator[Union[Record, Bad, None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise TinyLlamaError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    col = next((f for f in fields if f in names), None)
    if col is None:
        raise TinyLlamaError(f"{path}: no column {' / '.join(repr(f) for f in fields)} (columns: {names}); choose one with --field")
    extra = sorted({keys[0] for keys, _ in filters if keys[0] in names and keys[0] != col})
    total_rows = max(1, pf.metadata.num_rows)
    size = path.stat().st_size
    row = 0
    try:
        for batch in pf.iter_batches(columns=[col, *extra], batch_size=1024):
            cols = {n: batch.column(n).to_pylist() for n in [col, *extra]}
            for k in range(batch.num_rows):
                text = cols[col][k]
                if not isinstance(text, str):
                    yield Bad(row, f"column '{col}' is {'null' if text is None else type(text).__name__}, expected a string")
                elif filters and _dropped({n: cols[n][k] for n in cols}, filters):
                    yield None
                else:
                    yield Record(row, text)
                row += 1
            if progress is not None:
                progress(int(size * batch.num_rows / total_rows))
    except (pa.ArrowException, OSError) as e:
        yield Bad(row, f"corrupt parquet data ({e})", fatal=True)
