"""Compute-dtype (bf16) copies of fp32 master weights that persist across steps, kept current by the optimizer.

Why: under bf16 autocast every forward casts each fp32 weight to bf16 again (read 4 bytes, write 2 a
parameter: 1.77 ms a step for the 1.1B on an H200, perf/NOTES.md), although only the optimizer changes the
weights. The Triton AdamW (`kernels.adamw.TritonAdamW`) reads every weight anyway; with these copies attached
it also writes the new bf16 weight (2 bytes a parameter more), and the fused block's GEMMs read that copy.

The copies are stacked the way the fused block's GEMMs read them: one (rows, K) matrix for q/k/v, one for
gate/up, one each for o and down. Correctness never depends on the optimizer writing them: each copy
remembers the version counter and address of the weights it was cast from, and `get` re-casts a stale one.
An in-place change through torch's ops (a checkpoint load, `copy_`, `mul_`) bumps the version. Kernels that
write through raw pointers do not: the Triton kernel marks the copies it wrote as current after each step
(`mark_current`); weights its step leaves to torch's fused AdamW (which bumps no version counter either) are
cast into their copies right after that step, in the optimizer. A CUDA-graphed step does not run Python between
replays, so `tinyllama.train.graph` calls `refresh()` before each replay. What this cannot see: a write through `.data`
(which has its own version counter) or through raw pointers from elsewhere; call `refresh(force=True)` after
such a write.

Only for one device: under FSDP2 the weights are sharded DTensors and its mixed-precision policy gathers them
in bf16 (`attach_compute_weights` returns None there).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class ComputeWeights:
    """Stacked copies of groups of weights in `dtype`; `get(group)` returns a group's copy, current."""

    def __init__(self, groups: Sequence[Sequence[torch.nn.Parameter]], dtype: torch.dtype):
        self.dtype = dtype
        self.casts = 0  # groups cast so far (tests, and to see that the optimizer keeps them current)
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self._members: dict[tuple[int, ...], tuple[torch.nn.Parameter, ...]] = {}
        self._targets: dict[int, torch.Tensor] = {}  # id(param) -> its rows of the stacked copy
        self._synced: dict[int, tuple[int, int]] = {}  # id(param) -> (version, address) last cast or written
        for group in groups:
            group = tuple(group)
            k = group[0].shape[1]
            if any(p.dim() != 2 or p.shape[1] != k or p.device != group[0].device for p in group):
                raise ValueError("ComputeWeights: a group is 2-d weights with one column count, on one device")
            key = tuple(id(p) for p in group)
            buf = torch.empty((sum(p.shape[0] for p in group), k), dtype=dtype, device=group[0].device)
            self._buffers[key], self._members[key] = buf, group
            for p, rows in zip(group, buf.split([p.shape[0] for p in group])):
                self._targets[id(p)] = rows
            self._cast(key)

    @staticmethod
    def _stamp(p: torch.Tensor) -> tuple[int, int]:
        return p._version, p.data_ptr()

    def _cast(self, key: tuple[int, ...]) -> None:
        with torch.no_grad():
            for p in self._members[key]:
                self._targets[id(p)].copy_(p)
                self._synced[id(p)] = self._stamp(p)
        self.casts += 1

    def _stale(self, key: tuple[int, ...]) -> bool:
        return any(self._synced[id(p)] != self._stamp(p) for p in self._members[key])

    def get(self, group: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The stacked copy of these weights (in this order), re-cast first if any of them changed since; None
        for a group this object does not hold."""
        key = tuple(id(p) for p in group)
        if key not in self._buffers:
            return None
        if self._stale(key):
            self._cast(key)
        return self._buffers[key]

    def target(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """p's rows of its group's copy (what the optimizer writes), or None."""
        return self._targets.get(id(p))

    def mark_current(self, params: Sequence[torch.Tensor]) -> None:
        """These weights and their copies were just written alike (by the optimizer's kernel)."""
        for p in params:
            self._synced[id(p)] = self._stamp(p)

    def refresh(self, force: bool = False) -> int:
        """Re-cast every stale copy (every copy, with force); returns how many groups were cast."""
        stale = [key for key in self._buffers if force or self._stale(key)]
        for key in stale:
            self._cast(key)
        return len(stale)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def attach_compute_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           dtype: torch.dtype) -> Optional[ComputeWeights]:
    """Give the fused blocks of `model` persistent `dtype` copies of their projection weights, written by
    `optimizer` (a TritonAdamW) at each step; returns them, or None where they do not apply: another
    optimizer, no fused blocks, weights not plain fp32 tensors (FSDP2's DTensors), or dtype fp32."""
    from tinyllama.kernels.adamw import TritonAdamW
    from tinyllama.kernels.fused_block import FusedBlock

    blocks = [b for b in getattr(model, "layers", []) if isinstance(b, FusedBlock)]
    if not isinstance(optimizer, TritonAdamW) or not blocks or dtype == torch.float32:
        return None
    groups = [group for b in blocks for group in b.projection_groups()]
    if any(type(p.data) is not torch.Tensor or p.dtype != torch.float32 for g in groups for p in g):
        return None
    copies = ComputeWeights(groups, dtype)
    for b in blocks:
        b.compute_weights = copies
    optimizer.copies = copies
    return copies


def detach_compute_weights(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Undo `attach_compute_weights` (the blocks cast again each forward; the memory is freed)."""
    for b in getattr(model, "layers", []):
        if getattr(b, "compute_weights", None) is not None:
            b.compute_weights = None
    if optimizer is not None and getattr(optimizer, "copies", None) is not None:
        optimizer.copies = None
