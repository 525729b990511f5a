"""Synthetic token data for benchmarks and tests: no files, same interface as tinyllama.data's loaders.

Tokens follow a fixed random bigram language (each token has `branching` successors, chosen uniformly), so a
model can learn something and losses fall toward log(branching).
Block b of the stream depends only on (seed, split, b); rank r of W with batch B takes blocks
s·B·W + r·B … + B-1 at call s, so the concatenation over ranks equals the single-process batch of B·W
and the state (blocks consumed) is independent of the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tinyllama.checks import NONNEGATIVE_INT, POSITIVE_INT, check_fields
from tinyllama.errors import TinyLlamaError


@dataclass
class SyntheticDataConfig:
    """Stand-in DataConfig used when tinyllama.data is unavailable; only `sources: synthetic` works."""

    sources: str = "synthetic"
    seq_len: int = 2048
    seed: int = 1234
    vocab_size: int = 32000
    num_workers: int = 0
    # Accepted (and unused) so a recipe's data section works with `--data.sources synthetic`.
    paths: dict = field(default_factory=dict)
    ramp_to: str = ""
    ramp_blocks: int = 0

    def validate(self) -> None:
        check_fields(self, "data config: field '{}'", seq_len=POSITIVE_INT, vocab_size=POSITIVE_INT,
                     num_workers=NONNEGATIVE_INT)
        if self.sources != "synthetic":
            raise TinyLlamaError(
                f"data config: sources '{self.sources}' needs the data pipeline (tinyllama.data), which is not "
                "importable here; use sources: synthetic or install the data dependencies (zstandard, pyarrow)"
            )


class SyntheticLoader:
    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, split: str = "train", max_blocks: Optional[int] = None,
                 branching: int = 4) -> None:
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.split_salt = 0 if split == "train" else 7919
        self.max_blocks = max_blocks
        self.blocks_consumed = 0
        g = torch.Generator().manual_seed(seed)
        # A walk on a hidden cycle, steps of 1..branching, shown through a fixed random permutation of the vocab:
        # vectorised with cumsum, and each token has exactly `branching` possible successors.
        self.perm = torch.randperm(vocab_size, generator=g)
        self.branching = branching

    def _block(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.split_salt * 104_729 + index)
        n = self.seq_len + 1
        start = torch.randint(0, self.vocab_size, (1,), generator=g)
        steps = torch.randint(1, self.branching + 1, (n,), generator=g)
        steps[0] = 0
        return self.perm[(start + steps.cumsum(0)) % self.vocab_size]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = self.blocks_consumed + self.rank * self.batch_size
        if self.max_blocks is not None and self.blocks_consumed >= self.max_blocks:
            raise StopIteration
        batch = torch.stack([self._block(start + i) for i in range(self.batch_size)])
        self.blocks_consumed += self.batch_size * self.world_size
        return batch

    def state_dict(self) -> dict:
        return {"blocks_consumed": self.blocks_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.blocks_consumed = int(state["blocks_consumed"])
