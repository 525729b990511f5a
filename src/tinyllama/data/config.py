"""`data:` section of a training config, and turning it into train/validation loaders."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from tinyllama.config import build_config
from tinyllama.data.mixture import MixtureLoader
from tinyllama.data.shards import TokenSource
from tinyllama.errors import TinyLlamaError

# TinyLlama's mix: SlimPajama (prose) : StarCoder (code) = 7 : 3 by sampling weight.
DEMO_WEIGHTS = {"prose": 0.7, "code": 0.3}


@dataclass
class DataConfig:
    """Where training tokens come from. `sources` is "name:weight,name:weight"; a name is a prepared
    dataset directory, a key of `paths`, "demo" (the embedded prose+code corpus, 7:3) or "prose"/"code"
    (one half of the demo). `ramp_to` (same syntax, same names) linearly moves the weights from
    `sources` to these over the first `ramp_blocks` global samples (domain ramp for continual pretraining)."""

    sources: str = "demo"
    paths: dict[str, str] = field(default_factory=dict)
    seq_len: int = 2048
    seed: int = 42
    num_workers: int = 0
    ramp_to: str = ""
    ramp_blocks: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise TinyLlamaError(f"data config: field 'seq_len' must be a positive integer, got {self.seq_len!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise TinyLlamaError(f"data config: field 'num_workers' must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.seed, int):
            raise TinyLlamaError(f"data config: field 'seed' must be an integer, got {self.seed!r}")
        if not isinstance(self.paths, dict):
            raise TinyLlamaError(f"data config: field 'paths' must be a mapping name -> dataset dir, got {self.paths!r}")
        if not isinstance(self.ramp_blocks, int) or self.ramp_blocks < 0:
            raise TinyLlamaError(f"data config: field 'ramp_blocks' must be an integer >= 0, got {self.ramp_blocks!r}")
        parse_sources(self.sources)
        if self.ramp_to:
            parse_sources(self.ramp_to, "ramp_to")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        return build_config(cls, d, "data config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_sources(spec: str, what: str = "sources") -> list[tuple[str, float]]:
    """"a:0.7,b:0.3" -> [("a", 0.7), ("b", 0.3)]; a name without ":weight" weighs 1."""
    out = []
    if not isinstance(spec, str) or not spec.strip():
        raise TinyLlamaError(f"data config: field '{what}' is empty; give e.g. 'slimpajama:0.7,starcoder:0.3' or 'demo'")
    for part in spec.split(","):
        part = part.strip()
        name, sep, w = part.rpartition(":")
        if not sep or not _is_number(w):  # no weight (a path may contain ':')
            name, w = part, "1"
        weight = float(w)
        if not name or not (weight >= 0) or weight == float("inf"):
            raise TinyLlamaError(f"data config: field '{what}': bad entry {part!r}; expected name:weight with weight >= 0")
        out.append((name, weight))
    if sum(w for _, w in out) <= 0:
        raise TinyLlamaError(f"data config: field '{what}': weights {spec!r} are all zero")
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def resolve_sources(spec: str, cfg: DataConfig, data_root: Path, what: str = "sources") -> list[tuple[str, Path, float]]:
    """Expand names to (name, dataset dir, weight); "demo" prepares the embedded corpus under data_root."""
    out: list[tuple[str, Path, float]] = []
    demo: Optional[dict[str, Path]] = None
    for name, w in parse_sources(spec, what):
        if name in cfg.paths:
            out.append((name, Path(os.path.expanduser(cfg.paths[name])), w))
        elif name in ("demo", *DEMO_WEIGHTS) and not Path(name).exists():
            if demo is None:
                from tinyllama.data.demo import ensure_demo_dataset

                demo = ensure_demo_dataset(data_root)
            if name == "demo":
                out.extend((k, demo[k], w * dw) for k, dw in DEMO_WEIGHTS.items())
            else:
                out.append((name, demo[name], w))
        else:
            p = Path(os.path.expanduser(name))
            if not p.exists():
                raise TinyLlamaError(
                    f"data config: source {name!r} is neither a key of 'paths', 'demo', nor an existing dataset "
                    f"directory; prepare it with `tinyllama prepare INPUT... --output {name}`"
                )
            out.append((p.name, p, w))
    return out


def build_train_loader(cfg: DataConfig, batch_size: int, rank: int, world_size: int, data_root: Path) -> MixtureLoader:
    srcs = resolve_sources(cfg.sources, cfg, Path(data_root))
    weights_end = None
    if cfg.ramp_to:
        end = {n: w for n, _, w in resolve_sources(cfg.ramp_to, cfg, Path(data_root), "ramp_to")}
        missing = set(end) - {n for n, _, _ in srcs}
        if missing:
            raise TinyLlamaError(f"data config: field 'ramp_to' names {sorted(missing)} which are not in 'sources'")
        weights_end = [end.get(n, 0.0) for n, _, _ in srcs]
    return MixtureLoader(
        [(p, w) for _, p, w in srcs], cfg.seq_len, batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
        num_workers=cfg.num_workers, weights_end=weights_end, ramp_blocks=cfg.ramp_blocks,
        names=[n for n, _, _ in srcs],
    )


class ValLoader:
    """A fixed pass over the validation split of every source, in order (no weights, no shuffle).

    Blocks are consecutive seq_len+1 windows of each source's val tokens. Every rank yields the same
    number of batches (needed for collective ops): full global batches of world_size*batch_size, then
    one smaller batch of rem//world_size rows each if blocks remain (at most world_size-1 blocks unused).
    """

    def __init__(self, paths: list[tuple[str, Path]], seq_len: int, batch_size: int, rank: int, world_size: int,
                 max_blocks: Optional[int] = None) -> None:
        self.block, self.rank, self.world, self.bs = seq_len + 1, rank, world_size, batch_size
        self.sources = [(n, TokenSource(p, "val")) for n, p in paths]
        # Global val block k lives in source s = searchsorted(ends, k, "right") at block k - starts[s]
        # (no per-block list: a 0.5 % split of 10^12 tokens has millions of blocks).
        counts = np.array([ts.num_tokens // self.block for _, ts in self.sources], dtype=np.int64)
        self.ends = np.cumsum(counts)
        n = int(self.ends[-1]) if len(counts) else 0
        if max_blocks is not None:
            n = min(n, max(0, int(max_blocks)))
        g = world_size * batch_size
        self.num_full = n // g
        rem = n - self.num_full * g
        self.last_rows = rem // world_size if rem >= world_size else 0  # rows per rank in a final smaller batch
        self.num_blocks = self.num_full * g + self.last_rows * world_size

    def __len__(self) -> int:
        return self.num_full + (1 if self.last_rows else 0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        g = self.world * self.bs
        batches = [(i * g, self.bs) for i in range(self.num_full)]
        if self.last_rows:
            batches.append((self.num_full * g, self.last_rows))
        for start, b in batches:
            first = start + self.rank * b
            out = np.empty((b, self.block), dtype=np.int64)
            for r in range(b):
                k = first + r
                s = int(np.searchsorted(self.ends, k, side="right"))
                local = k - (int(self.ends[s - 1]) if s else 0)
                self.sources[s][1].read(local * self.block, self.block, out[r])
            yield torch.from_numpy(out)


def val_loader(cfg: DataConfig, batch_size: int, rank: int, world_size: int, data_root: Path,
               max_blocks: Optional[int] = None) -> ValLoader:
    srcs = resolve_sources(cfg.sources, cfg, Path(data_root))
    return ValLoader([(n, p) for n, p, _ in srcs], cfg.seq_len, batch_size, rank, world_size, max_blocks)


def val_loaders(cfg: DataConfig, batch_size: int, rank: int, world_size: int, data_root: Path,
                max_blocks: Optional[int] = None) -> list[tuple[str, ValLoader]]:
    """One validation loader per source, `max_blocks` split evenly across them: [(name, loader), ...]."""
    srcs = resolve_sources(cfg.sources, cfg, Path(data_root))
    share = None if max_blocks is None else -(-int(max_blocks) // len(srcs))
    return [(n, ValLoader([(n, p)], cfg.seq_len, batch_size, rank, world_size, share)) for n, p, _ in srcs]
