"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding, crash-safe.

Layout of one checkpoint, `OUT/checkpoints/step-0000100/`::

    .metadata, __0_0.distcp …      DCP: model + optimizer (every rank writes its shards)
    trainer_state.pt               step, tokens seen, loader state, counters (rank 0)
    rng/rank-00000.pt …            RNG states of each rank
    meta.json                      human-readable summary and the run config
    integrity.json                 size and crc32 (per 16 MiB block) of every other file (rank 0)

Everything is written into `step-XXXXXXX.tmp/` and renamed to `step-XXXXXXX/` only after every rank
finished, then `latest` (a one-line file) is replaced atomically. A kill -9 mid-write leaves only a
`.tmp` directory, which is ignored and cleaned up; the previous checkpoint is never touched. Model and
optimizer are saved with `get_state_dict`, so a checkpoint loads on any number of processes.

Damage after the fact (a truncated copy, a bad disk) is caught by `integrity.json`: rank 0 writes it
when the save is finalised (after every rank's files are complete, also for async saves: the same
`_finalize`), by reading the files back; `verify_checkpoint` checks sizes and checksums before a load.
`choose_resume_checkpoint` skips a damaged newest checkpoint for the previous intact one. Checkpoints
from before integrity records load unverified.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tinyllama.errors import TinyLlamaError
from tinyllama.train.distributed import DistInfo, barrier

# Single-process saves/loads are intended; DCP warns about each one otherwise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_RE = re.compile(r"^step-(\d{7,})$")
INTEGRITY_FILE = "integrity.json"
_CRC_BLOCK = 16 << 20  # checksummed separately: blocks of one big file verify in parallel


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- integrity ---------------------------------------------------------------------------------------
class DamagedCheckpoint(TinyLlamaError):
    def __init__(self, path: Path, detail: str) -> None:
        self.path, self.detail = Path(path), detail
        super().__init__(f"{path}: damaged checkpoint: {detail}; use an earlier checkpoint or restore this one "
                         f"from a copy")


def _block_crc(path: Path, index: int) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return f"{zlib.crc32(os.pread(fd, _CRC_BLOCK, index * _CRC_BLOCK)):08x}"
    finally:
        os.close(fd)


def _crc_blocks(files: dict[str, Path], sizes: dict[str, int]) -> dict[str, list[str]]:
    """crc32 of every 16 MiB block of each file; a few threads, as zlib releases the GIL while it sums."""
    jobs = [(rel, i) for rel in files for i in range(-(-sizes[rel] // _CRC_BLOCK))]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(lambda job: _block_crc(files[job[0]], job[1]), jobs))
    out: dict[str, list[str]] = {rel: [] for rel in files}
    for (rel, _), crc in zip(jobs, sums):
        out[rel].append(crc)
    return out


def write_integrity_record(path: Path) -> None:
    """Record size and block checksums of every file under the checkpoint directory `path`."""
    path = Path(path)
    files = {f.relative_to(path).as_posix(): f for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != INTEGRITY_FILE}
    sizes = {rel: f.stat().st_size for rel, f in files.items()}
    crcs = _crc_blocks(files, sizes)
    record = {"format": 1, "checksum": "crc32", "block_bytes": _CRC_BLOCK,
              "files": {rel: {"size": sizes[rel], "crc32": crcs[rel]} for rel in files}}
    _atomic_write(path / INTEGRITY_FILE, (json.dumps(record, indent=1) + "\n").encode())


def _expects_record(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("integrity") == INTEGRITY_FILE
    except (OSError, ValueError, AttributeError):
        return False


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True) -> Optional[str]:
    """Check a checkpoint directory against its integrity record; raises DamagedCheckpoint naming the
    first damaged file. Returns None when verified, or a note when it has no record (an older save).

    Sizes are always compared; `checksums` also reads every file (~0.1 s per 100 MB, page cache hot)."""
    path = Path(path)
    for need in (".metadata", "trainer_state.pt"):
        if not (path / need).is_file():
            raise DamagedCheckpoint(path, f"{need} is missing")
    record_file = path / INTEGRITY_FILE
    if not record_file.is_file():
        if _expects_record(path):
            raise DamagedCheckpoint(path, f"{INTEGRITY_FILE} is missing")
        return f"{path.name} has no {INTEGRITY_FILE} (saved by an older tinyllama), so it is not verified"
    try:
        record = json.loads(record_file.read_text())
        entries = {rel: (int(e["size"]), list(e["crc32"])) for rel, e in record["files"].items()}
        if int(record["block_bytes"]) != _CRC_BLOCK:
            raise ValueError("block size")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(path, f"{INTEGRITY_FILE} is unreadable") from None
    files = {rel: path / rel for rel in entries}
    for rel, f in files.items():
        if not f.is_file():
            raise DamagedCheckpoint(path, f"{rel} is missing")
        size, want = f.stat().st_size, entries[rel][0]
        if size < want:
            raise DamagedCheckpoint(path, f"{rel} is truncated: {size:,} of {want:,} bytes")
        if size > want:
            raise DamagedCheckpoint(path, f"{rel} has {size:,} bytes, {want:,} were written")
    if checksums:
        got = _crc_blocks(files, {rel: e[0] for rel, e in entries.items()})
        for rel, sums in got.items():
            bad = [i for i, (a, b) in enumerate(zip(sums, entries[rel][1])) if a != b]
            if bad or len(sums) != len(entries[rel][1]):
                start = bad[0] * _CRC_BLOCK if bad else 0
                end = min(start + _CRC_BLOCK, entries[rel][0])
                raise DamagedCheckpoint(path, f"{rel} is corrupted: bytes {start:,}-{end:,} do not match their "
                                              f"checksum")
    return None


def _decided_by_main(info: Optional[DistInfo], fn):
    """fn() on rank 0 only, its result (or its TinyLlamaError) given to every rank: one decision for all
    ranks, and the files are read once rather than once per rank."""
    if info is None or not info.is_distributed:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except TinyLlamaError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise TinyLlamaError(value)
    return value


def _set_aside(path: Path) -> Path:
    n, dest = 1, path.with_name(path.name + ".damaged")
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, dest)
    return dest


def _choose_resume(root: Path, checksums: bool) -> tuple[Optional[Path], list[str]]:
    dirs = {p.name: p for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir()} if root.is_dir() else {}
    order = sorted(dirs, key=lambda n: int(STEP_RE.match(n).group(1)), reverse=True)
    lines: list[str] = []
    pointer = root / "latest"
    named = _read_pointer(root)
    if named is not None and named in dirs:
        order.remove(named)
        order.insert(0, named)
    elif named is not None:
        lines.append(f"warning: {pointer} names {named!r}, which does not exist")
    damaged: list[DamagedCheckpoint] = []
    for name in order:
        try:
            note = verify_checkpoint(dirs[name], checksums)
        except DamagedCheckpoint as e:
            damaged.append(e)
            continue
        for e in damaged:  # out of the way of new saves and pruning, kept for inspection
            lines.append(f"warning: checkpoint {e.path.name} is damaged: {e.detail}; moved it to "
                         f"{_set_aside(e.path).name}")
        if lines:
            lines.append(f"warning: resuming from the newest intact checkpoint, {name}")
        if note:
            lines.append(f"note: {note}")
        if named != name:
            _atomic_write(pointer, (name + "\n").encode())
        return dirs[name], lines
    if damaged:
        detail = "; ".join(f"{e.path.name}: {e.detail}" for e in damaged)
        raise TinyLlamaError(f"{root}: no intact checkpoint to resume from ({detail}); restore one from a copy, "
                             f"or start a new run in another --out")
    if named is not None:
        raise TinyLlamaError(f"{pointer} names {named!r}, which does not exist, and {root} holds no other checkpoint; "
                             f"restore it, or delete {pointer} to start from scratch")
    return None, []


def choose_resume_checkpoint(root: str | os.PathLike, info: Optional[DistInfo] = None,
                             checksums: bool = True) -> tuple[Optional[Path], list[str]]:
    """The checkpoint `--resume` continues from in `root` (OUT/checkpoints), and lines to print.

    Candidates: the one `latest` names, then the other step directories, newest first; the first that
    verifies is chosen. Damaged ones skipped on the way are renamed `step-N.damaged` and `latest` is
    pointed at the choice, each with a warning line. (None, []) when there are no checkpoints at all;
    a TinyLlamaError when there are some but none is intact, or only a `latest` naming a missing one.
    """
    path, lines = _decided_by_main(info, lambda: _choose_resume(Path(root), checksums))
    return (Path(path) if path is not None else None), lines


def _read_pointer(root: Path) -> Optional[str]:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def is_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "trainer_state.pt").is_file()


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and is_checkpoint(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_root: Path) -> Optional[Path]:
    """The checkpoint named by `latest`, else the highest complete step directory."""
    name = _read_pointer(ckpt_root)
    if name is not None and STEP_RE.match(name) and is_checkpoint(ckpt_root / name):
        return ckpt_root / name
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run/checkpoints directory (its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise TinyLlamaError(f"{p}: checkpoint not found")
    if is_checkpoint(p):
        return p
    for root in (p, p / "checkpoints"):
        name = _read_pointer(root)
        if name is not None and not is_checkpoint(root / name):
            # Not the highest step directory instead: which checkpoint to use is the user's call.
            state = "is not a complete checkpoint" if (root / name).exists() else "does not exist"
            found = list_checkpoints(root)
            raise TinyLlamaError(f"{root / 'latest'} names {name!r}, which {state}; give a step directory instead"
                                 + (f", e.g. {found[-1][1]}" if found else ""))
        latest = find_latest(root)
        if latest is not None:
            return latest
    raise TinyLlamaError(f"{p}: not a training checkpoint (no .metadata + trainer_state.pt) and holds none")


class CheckpointManager:
    """Saves (optionally asynchronously), finalises by rename, prunes and loads training checkpoints."""

    def __init__(self, out_dir: str | os.PathLike, info: DistInfo, keep_last: int = 2, keep_every: int = 0,
                 use_async: bool = False) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.info = info
        self.keep_last, self.keep_every = keep_last, keep_every
        self.use_async = use_async and hasattr(dcp, "async_save")
        self._pending: Optional[tuple[Any, int, Path]] = None  # (future, step, tmp dir)
        self._verified: Optional[Path] = None  # chosen (and verified) by resume_point
        self._async_pg = None
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for pattern in ("step-*.tmp", ".deleting-step-*"):  # left by a crash: never valid checkpoints
                for p in self.root.glob(pattern):
                    shutil.rmtree(p, ignore_errors=True)
        barrier(info)
        if self.use_async and info.is_distributed:
            # Background saves talk on their own gloo group so they never interleave with training collectives.
            self._async_pg = dist.new_group(backend="gloo")

    # ---- save ------------------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer, trainer_state: dict, meta: dict,
             block: bool = False) -> None:
        self.wait()  # one save in flight at a time
        final = self.root / step_dir_name(step)
        if final.exists() and is_checkpoint(final):
            return
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.info)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.info.rank:05d}.pt")
        if self.info.is_main:
            torch.save(trainer_state, tmp / "trainer_state.pt")
            meta = {**meta, "integrity": INTEGRITY_FILE}  # so a lost record reads as damage, not as an old save
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        if self.use_async and not block:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_pg)
            self._pending = (future, step, tmp)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            barrier(self.info)
            self._finalize(step, tmp)

    def poll(self) -> None:
        """Finalise a finished background save (cheap; call once per step)."""
        if self._pending is not None and self._pending[0].done():
            future, step, tmp = self._pending
            self._pending = None
            future.result()  # re-raise a failed write
            self._finalize(step, tmp)

    def wait(self) -> None:
        if self._pending is not None:
            future, step, tmp = self._pending
            self._pending = None
            future.result()
            self._finalize(step, tmp)

    def abandon(self) -> None:
        """Give up a save that was interrupted (a second Ctrl-C): its `.tmp` directory goes, published
        checkpoints and `latest` stay as they were."""
        self._pending = None
        if self.info.is_main:
            for p in self.root.glob("step-*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    def _finalize(self, step: int, tmp: Path) -> None:
        # The coordinator's save returns only after every rank wrote its files (DCP gathers their results
        # before writing .metadata), so rank 0 can publish without another barrier.
        if not self.info.is_main:
            return
        final = self.root / step_dir_name(step)
        write_integrity_record(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _atomic_write(self.root / "latest", (final.name + "\n").encode())
        self._prune()

    def _prune(self) -> None:
        found = list_checkpoints(self.root)
        keep = {s for s, _ in found[-self.keep_last:]} if self.keep_last > 0 else set()
        if found:
            keep.add(found[-1][0])  # never delete the newest
        if self.keep_every > 0:
            keep |= {s for s, _ in found if s % self.keep_every == 0}
        for s, p in found:
            if s not in keep:
                # Rename first: a kill mid-delete must not leave a half-deleted dir that looks like a checkpoint.
                doomed = p.with_name(f".deleting-{p.name}")
                os.replace(p, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        return find_latest(self.root)

    def resume_point(self, say=print) -> Optional[Path]:
        """`choose_resume_checkpoint` for this run, its lines printed with `say`; `load` trusts its check."""
        path, lines = choose_resume_checkpoint(self.root, self.info)
        for line in lines:
            say(line)
        self._verified = path
        return path

    def load(self, path: Path, model: nn.Module, optimizer, load_optimizer: bool = True,
             load_rng: bool = True) -> dict:
        path = Path(path)
        if not is_checkpoint(path):
            raise TinyLlamaError(f"{path}: not a complete training checkpoint")
        if path != self._verified:
            _decided_by_main(self.info, lambda: verify_checkpoint(path))
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd}
        if load_optimizer:
            state["optim"] = osd
        _dcp_load(state, path, "cannot load this checkpoint into the configured model/optimizer ({}); "
                               "does --model match the run that wrote it?")
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"] if load_optimizer else {})
        trainer_state = _torch_load(path / "trainer_state.pt")
        rng_file = path / "rng" / f"rank-{self.info.rank:05d}.pt"
        if load_rng and rng_file.is_file():
            set_rng_state(_torch_load(rng_file))
        return trainer_state


def _torch_load(file: Path):
    try:
        return torch.load(file, weights_only=False)
    except Exception as e:  # truncated or overwritten (checkpoints without an integrity record get here)
        raise TinyLlamaError(f"{file}: unreadable ({type(e).__name__}); the checkpoint is damaged") from None


def _dcp_load(state: dict, path: Path, problem: str) -> None:
    """dcp.load with one-line errors; `problem` is the message, `{}` the cause."""
    try:
        # A corrupt .metadata makes DCP log two tracebacks before it raises: read it first, quietly.
        FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise TinyLlamaError(f"{path / '.metadata'}: unreadable ({type(e).__name__}); the checkpoint is "
                             f"damaged") from None
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException (shape/key mismatch) is a BaseException
        first = str(e).strip().splitlines()
        raise TinyLlamaError(f"{path}: " + problem.format(first[-1][:300] if first else type(e).__name__)) from None


def load_model_weights(path: str | os.PathLike, model: nn.Module, verify: bool = True) -> Optional[str]:
    """Load only the model weights of a training checkpoint into a plain (single-process) model.

    Refuses a damaged checkpoint (`verify_checkpoint`, unless the caller did that); returns its note."""
    path = resolve_checkpoint(path)
    note = verify_checkpoint(path) if verify else None
    msd = get_model_state_dict(model)
    state = {"model": msd}
    _dcp_load(state, path, "checkpoint does not fit this model ({})")
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    return note


def read_meta(path: Path) -> dict:
    f = Path(path) / "meta.json"
    if not f.is_file():
        raise TinyLlamaError(f"{path}: meta.json missing; cannot tell which model this checkpoint holds")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TinyLlamaError(f"{f}: not valid JSON ({e})") from None


