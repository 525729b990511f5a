"""The training loader: a weighted, shuffled, sharded, exactly resumable mixture of prepared datasets.

Design (why it resumes in O(1) on any number of GPUs):
- The mixture is one global stream of blocks (seq_len + 1 tokens). Global sample i comes from the
  source whose cumulative target weight is furthest ahead of what it has received so far ("largest
  deficit" interleave), so realised proportions track the weights to within a block, and a linear
  ramp of the weights is just a function of i.
- Within a source, epoch e is a grid of non-overlapping blocks over the concatenated split (the grid
  is shifted by a seeded offset in later epochs so the tail tokens are trained on too), visited in
  the order of a seeded Feistel permutation: random access with O(1) memory, so 10^9 blocks need no
  index array, and block k of epoch e is computed directly.
- The whole state is: global sample count + per source (blocks taken, epoch, position). It is the
  same on every rank and independent of world size. Rank r of W takes samples
  [i + r*B, i + (r+1)*B) of each global batch of W*B; DataLoader workers take whole steps round-robin.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.utils.data as tud

from tinyllama.data.shards import TokenSource
from tinyllama.errors import TinyLlamaError

_M64 = (1 << 64) - 1
_ROUNDS = 6


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a strong 64-bit bit mixer for the Feistel round function
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def _keys(*parts) -> list[int]:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8 * (_ROUNDS + 1)).digest()
    return list(struct.unpack(f"<{_ROUNDS + 1}Q", digest))


class Permutation:
    """A seeded bijection of range(n) (balanced Feistel network + cycle walking), O(1) memory."""

    def __init__(self, n: int, key: Sequence[int]) -> None:
        if n <= 0:
            raise ValueError("n must be positive")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = list(key)[:_ROUNDS]

    def __call__(self, x: int) -> int:
        if not 0 <= x < self.n:
            raise IndexError(x)
        h, m = self.half, self.mask
        while True:  # cycle walking: the domain is < 4n, so this loops < 4 times on average
            left, right = x >> h, x & m
            for k in self.keys:
                left, right = right, left ^ (_mix64((right + k) & _M64) & m)
            x = (left << h) | right
            if x < self.n:
                return x


class _Source:
    """A train split with its per-epoch block grids and permutations."""

    def __init__(self, name: str, tokens: TokenSource, seq_len: int, seed: int) -> None:
        self.name, self.tokens, self.block, self.seed = name, tokens, seq_len + 1, seed
        if tokens.num_tokens < self.block:
            raise TinyLlamaError(
                f"{tokens.path}: source '{name}' has {tokens.num_tokens} tokens in its '{tokens.split}' split, "
                f"fewer than one block of seq_len+1 = {self.block}; use a shorter seq_len or more data"
            )
        self._cache: dict[int, tuple[int, int, Permutation]] = {}

    def epoch(self, e: int) -> tuple[int, int, Permutation]:
        """(grid offset, number of blocks, permutation) of epoch e."""
        got = self._cache.get(e)
        if got is None:
            keys = _keys("tinyllama-mixture", self.seed, self.name, e)
            offset = 0 if e == 0 else keys[-1] % self.block
            if self.tokens.num_tokens - offset < self.block:
                offset = 0
            n = (self.tokens.num_tokens - offset) // self.block
            got = (offset, n, Permutation(n, keys))
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[e] = got
        return got

    def num_blocks(self, e: int) -> int:
        return self.epoch(e)[1]

    def block_start(self, e: int, pos: int) -> int:
        offset, _, perm = self.epoch(e)
        return offset + perm(pos) * self.block

    def read_block(self, e: int, pos: int, out: np.ndarray) -> None:
        self.tokens.read(self.block_start(e, pos), self.block, out)


@dataclass
class _Cursor:
    blocks: int = 0  # blocks taken from this source in total
    epoch: int = 0
    pos: int = 0  # position in this epoch's permutation


class MixturePlan:
    """Which (source, epoch, position) global sample i is; pure numpy/Python so workers need no torch."""

    def __init__(self, sources: list[_Source], weights: Sequence[float], weights_end: Optional[Sequence[float]] = None,
                 ramp_blocks: int = 0) -> None:
        self.sources = sources
        self.w0 = _normalise(weights, "weights")
        self.w1 = _normalise(weights_end, "weights_end") if weights_end is not None else self.w0
        if len(self.w1) != len(self.w0):
            raise TinyLlamaError("mixture: weights_end must have one weight per source")
        self.ramp = int(ramp_blocks) if weights_end is not None else 0
        if self.ramp < 0:
            raise TinyLlamaError(f"mixture: ramp_blocks must be >= 0, got {ramp_blocks}")

    def weights_at(self, i: int) -> list[float]:
        t = 1.0 if self.ramp == 0 else min(i / self.ramp, 1.0)
        return [a + (b - a) * t for a, b in zip(self.w0, self.w1)]

    def target(self, s: int, n: int) -> float:
        """Sum of source s's weight over samples 0..n-1 (closed form for the linear ramp)."""
        a, b, r = self.w0[s], self.w1[s], self.ramp
        if r == 0:
            return n * b
        m = min(n, r)
        t = m * a + (b - a) * (m * (m - 1) / 2) / r
        return t + (n - m) * b

    def next_source(self, i: int, cursors: list[_Cursor]) -> int:
        best, best_deficit = 0, -float("inf")
        for s, c in enumerate(cursors):
            d = self.target(s, i + 1) - c.blocks
            if d > best_deficit + 1e-9:
                best, best_deficit = s, d
        return best

    def take(self, i: int, cursors: list[_Cursor]) -> tuple[int, int, int]:
        """Assign global sample i: returns (source, epoch, pos) and advances that source's cursor."""
        s = self.next_source(i, cursors)
        c = cursors[s]
        e, p = c.epoch, c.pos
        c.blocks += 1
        c.pos += 1
        if c.pos >= self.sources[s].num_blocks(c.epoch):
            c.epoch += 1
            c.pos = 0
        return s, e, p


def _normalise(weights: Optional[Sequence[float]], what: str) -> list[float]:
    w = [float(x) for x in weights]
    if any(not (x >= 0) or x == float("inf") for x in w) or sum(w) <= 0:
        raise TinyLlamaError(f"mixture: {what} must be finite, >= 0 and not all zero, got {list(weights)}")
    total = sum(w)
    return [x / total for x in w]


class _State:
    def __init__(self, n_sources: int) -> None:
        self.samples = 0
        self.cursors = [_Cursor() for _ in range(n_sources)]

    def copy(self) -> "_State":
        s = _State(0)
        s.samples = self.samples
        s.cursors = [_Cursor(c.blocks, c.epoch, c.pos) for c in self.cursors]
        return s


def _global_batch(plan: MixturePlan, state: _State, rank: int, world_size: int, batch_size: int,
                  want: bool) -> list[tuple[int, int, int]]:
    """Advance state by one global batch; return this rank's (source, epoch, pos) list if `want`."""
    mine = []
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    for j in range(world_size * batch_size):
        where = plan.take(state.samples, state.cursors)
        state.samples += 1
        if want and lo <= j < hi:
            mine.append(where)
    return mine


def _gather(plan: MixturePlan, picks: list[tuple[int, int, int]], block: int) -> np.ndarray:
    out = np.empty((len(picks), block), dtype=np.int64)
    for row, (s, e, p) in enumerate(picks):
        plan.sources[s].read_block(e, p, out[row])
    return out


class _TorchStream(tud.IterableDataset):
    def __init__(self, body: "_WorkerStream") -> None:
        self.body = body

    def __iter__(self):
        return iter(self.body)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: SIGTERM/SIGINT sent to the whole process group (`timeout`, SLURM, Ctrl-C) are
    for the main process, which finishes its step and checkpoints; a worker killed by one would take the
    run down with it ("DataLoader worker is killed by signal"). Workers still exit with their parent (torch's
    watchdog) or when the loader is closed."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(item):
    # Ship numpy arrays through the worker pipe as bytes: cheaper than torch's per-tensor shared memory.
    return item


class _WorkerStream:
    """torch IterableDataset body: worker w of n yields steps w, w+n, ... (DataLoader interleaves them back)."""

    def __init__(self, plan: MixturePlan, state: _State, rank: int, world_size: int, batch_size: int, block: int):
        self.plan, self.state, self.rank, self.world, self.bs, self.block = plan, state, rank, world_size, batch_size, block

    def __iter__(self):
        info = tud.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        state = self.state.copy()
        step = 0
        while True:
            picks = _global_batch(self.plan, state, self.rank, self.world, self.bs, want=(step % nw == wid))
            if step % nw == wid:
                yield step, _gather(self.plan, picks, self.block)
            step += 1


class MixtureLoader:
    """Yields this rank's micro-batches, LongTensor (batch_size, seq_len + 1), forever.

    sources: [(dataset dir or LITPKDS dir/file, weight), ...]. Concatenating the micro-batches of ranks
    0..W-1 at a step gives exactly the batch a single process with batch_size*W gets at that step.
    """

    def __init__(self, sources: list[tuple[str | Path, float]], seq_len: int, batch_size: int, *, seed: int = 42,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, split: str = "train",
                 weights_end: Optional[Sequence[float]] = None, ramp_blocks: int = 0, names: Optional[Sequence[str]] = None,
                 pin_memory: bool = False, multiprocessing_context: Optional[str] = None,
                 expect_tokenizer: Optional[str] = None) -> None:
        if not sources:
            raise TinyLlamaError("mixture: no sources given")
        for what, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(v, int) or v <= 0:
                raise TinyLlamaError(f"mixture: {what} must be a positive integer, got {v!r}")
        if not 0 <= rank < world_size:
            raise TinyLlamaError(f"mixture: rank {rank} is outside world size {world_size}")
        if num_workers < 0:
            raise TinyLlamaError(f"mixture: num_workers must be >= 0, got {num_workers}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.pin_memory, self.mp_context = pin_memory, multiprocessing_context
        names = list(names) if names is not None else [None] * len(sources)
        built, used = [], set()
        for (path, _), name in zip(sources, names):
            ts = TokenSource(path, split)
            name = name or ts.name
            if name in used:
                name = f"{name}#{len(built)}"
            used.add(name)
            built.append(_Source(name, ts, seq_len, seed))
        prints = {s.tokens.tokenizer_fingerprint for s in built} - {None}
        if expect_tokenizer is not None:
            prints.add(expect_tokenizer)
        if len(prints) > 1:
            raise TinyLlamaError(
                "mixture: sources were tokenized with different tokenizers "
                + ", ".join(f"{s.name}={s.tokens.tokenizer_fingerprint}" for s in built)
                + (f" (model tokenizer {expect_tokenizer})" if expect_tokenizer else "")
                + "; re-run `tinyllama prepare --tokenizer ...` with the model's tokenizer"
            )
        self.plan = MixturePlan(built, [w for _, w in sources], weights_end, ramp_blocks)
        self.names = [s.name for s in built]
        self._state = _State(len(built))
        self._iter = None

    # ---- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> "MixtureLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self.num_workers == 0:
            picks = _global_batch(self.plan, self._state, self.rank, self.world_size, self.batch_size, want=True)
            batch = torch.from_numpy(_gather(self.plan, picks, self.seq_len + 1))
            return batch.pin_memory() if self.pin_memory else batch
        if self._iter is None:
            self._start_workers()
        step, arr = next(self._iter)
        batch = torch.from_numpy(arr)
        if self.pin_memory:
            batch = batch.pin_memory()
        if step != self._steps_since_start:
            raise RuntimeError(f"data loader workers out of order: got step {step}, expected {self._steps_since_start}")
        self._steps_since_start += 1
        _global_batch(self.plan, self._state, self.rank, self.world_size, self.batch_size, want=False)
        return batch

    def _start_workers(self) -> None:
        ctx = self.mp_context or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        body = _WorkerStream(self.plan, self._state.copy(), self.rank, self.world_size, self.batch_size, self.seq_len + 1)
        dl = tud.DataLoader(_TorchStream(body), batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            multiprocessing_context=ctx, prefetch_factor=4,
                            worker_init_fn=_ignore_stop_signals)
        self._dl = dl
        self._iter = iter(dl)
        self._steps_since_start = 0

    def close(self) -> None:
        """Stop worker processes (they also stop when the loader is garbage-collected)."""
        self._iter = None
        self._dl = None

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "samples": self._state.samples,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": [
                {"name": n, "blocks": c.blocks, "epoch": c.epoch, "pos": c.pos}
                for n, c in zip(self.names, self._state.cursors)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            if state.get("version") != 1:
                raise TinyLlamaError(f"loader state: unknown version {state.get('version')!r}")
            if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
                raise TinyLlamaError(
                    f"loader state: saved with seq_len={state['seq_len']} seed={state['seed']}, but this loader has "
                    f"seq_len={self.seq_len} seed={self.seed}; resume with the same data settings"
                )
            names = [s["name"] for s in state["sources"]]
            if names != self.names:
                raise TinyLlamaError(f"loader state: saved for sources {names}, but this loader reads {self.names}")
            new = _State(len(self.names))
            new.samples = int(state["samples"])
            for c, s in zip(new.cursors, state["sources"]):
                c.blocks, c.epoch, c.pos = int(s["blocks"]), int(s["epoch"]), int(s["pos"])
        except (KeyError, TypeError, AttributeError) as e:
            raise TinyLlamaError(f"loader state: malformed ({e!r}); was it saved by MixtureLoader.state_dict()?") from None
        self._state = new
        self.close()  # workers restart from the restored state on the next batch

    def stats(self) -> dict:
        w = self.plan.weights_at(self._state.samples)
        return {
            "samples": self._state.samples,
            "tokens": self._state.samples * (self.seq_len + 1),
            "sources": {
                n: {"blocks": c.blocks, "epoch": c.epoch, "epoch_progress": c.pos / max(1, s.num_blocks(c.epoch)),
                    "share": c.blocks / max(1, self._state.samples), "weight": wi}
                for n, c, s, wi in zip(self.names, self._state.cursors, self.plan.sources, w)
            },
        }

    @property
    def tokenizer_fingerprints(self) -> dict[str, Optional[str]]:
        return {s.name: s.tokens.tokenizer_fingerprint for s in self.plan.sources}
