"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding, crash-safe.

Layout of one checkpoint, `OUT/checkpoints/step-0000100/`::

    .metadata, __0_0.distcp …      DCP: model + optimizer (every rank writes its shards)
    trainer_state.pt               step, tokens seen, loader state, counters (rank 0)
    rng/rank-00000.pt …            RNG states of each rank
    meta.json                      human-readable summary and the run config

Everything is written into `step-XXXXXXX.tmp/` and renamed to `step-XXXXXXX/` only after every rank
finished, then `latest` (a one-line file) is replaced atomically. A kill -9 mid-write leaves only a
`.tmp` directory, which is ignored and cleaned up; the previous checkpoint is never touched. Model and
optimizer are saved with `get_state_dict`, so a checkpoint loads on any number of processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
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
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        p = ckpt_root / name
        if STEP_RE.match(name) and is_checkpoint(p):
            return p
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

    def load(self, path: Path, model: nn.Module, optimizer, load_optimizer: bool = True,
             load_rng: bool = True) -> dict:
        path = Path(path)
        if not is_checkpoint(path):
            raise TinyLlamaError(f"{path}: not a complete training checkpoint")
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd}
        if load_optimizer:
            state["optim"] = osd
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # shape/key mismatches surface as CheckpointException
            first = str(e).strip().splitlines()
            raise TinyLlamaError(
                f"{path}: cannot load this checkpoint into the configured model/optimizer "
                f"({first[-1][:300] if first else type(e).__name__}); does --model match the run that wrote it?"
            ) from None
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"] if load_optimizer else {})
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
        rng_file = path / "rng" / f"rank-{self.info.rank:05d}.pt"
        if load_rng and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer_state


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load only the model weights of a training checkpoint into a plain (single-process) model."""
    path = resolve_checkpoint(path)
    msd = get_model_state_dict(model)
    state = {"model": msd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        first = str(e).strip().splitlines()
        raise TinyLlamaError(
            f"{path}: checkpoint does not fit this model ({first[-1][:300] if first else type(e).__name__})"
        ) from None
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))


def read_meta(path: Path) -> dict:
    f = Path(path) / "meta.json"
    if not f.is_file():
        raise TinyLlamaError(f"{path}: meta.json missing; cannot tell which model this checkpoint holds")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TinyLlamaError(f"{f}: not valid JSON ({e})") from None


