"""A training step replayed from one CUDA graph: forward, loss, backward, clip and fused AdamW in one launch.

Why: the fused step issues ~1,500 kernels a step through autograd and Python; a replayed graph costs the host
one launch, so the GPU never waits for the host. Measured on an H200 at 8 × 2048 (perf/NOTES.md): the eager
step was already GPU-bound there, and the graph gained 0.2-0.6 %; it matters where the host is slower than
the GPU (smaller batches, slower CPUs).

What capture needs, and how the step provides it:
- fixed addresses: each batch is copied into one static tensor. Gradients are created during the capture (set
  to None first), so every replay writes them in place and the captured clip and AdamW read them there;
- no host values baked in: fused AdamW's learning rate is a float the kernel would keep, so during capture each
  param group's lr is a device tensor, refilled from the group's float before every replay. Between replays
  the groups hold plain floats, so `set_lr`, state_dict and checkpoints see what they always saw. The clip
  factor and found_inf are device tensors already (`clip_or_step_on_device`);
- no host sync inside the step: nothing is read back there (callers read loss and norm after the replay);
- kernels compiled and autotuned before capture: the first `eager_steps` steps run as they are, on a side
  stream (as PyTorch's whole-network capture recipe warms up).
The weights, moments and step counts are the optimizer's own tensors: eager steps, replays, checkpoints and
resumes all act on the same ones.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tinyllama.errors import TinyLlamaError


def graph_problem(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why this model and optimizer cannot run as a captured step (None: they can)."""
    if not torch.cuda.is_available() or not all(p.is_cuda for p in model.parameters()):
        return "needs the model on a CUDA GPU"
    if not optimizer.defaults.get("fused"):
        return "needs fused AdamW (leave optim.fused unset or true)"
    return None


class GraphedStep:
    """`step(batch) -> outputs` of `fn`, replayed from a CUDA graph after `eager_steps` eager calls.

    fn(batch) runs one whole optimizer step on a device batch (forward, backward, `clip_or_step_on_device`
    with fused AdamW) and returns device tensors (loss, norm, ...): after a replay those are the graph's
    static outputs, overwritten by the next replay, so read them before calling again. The caller drops the
    gradients after each step as usual (`zero_grad(set_to_none=True)`): that only lets go of the Python
    references, the graph keeps writing into its own pool.
    """

    def __init__(self, fn: Callable[[torch.Tensor], tuple], optimizer: torch.optim.Optimizer, eager_steps: int = 2):
        if eager_steps < 1:  # the first step creates AdamW's moments: captured, every replay would zero them
            raise ValueError("GraphedStep: eager_steps must be at least 1")
        self.fn, self.optimizer, self.eager_steps = fn, optimizer, eager_steps
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_batch: Optional[torch.Tensor] = None
        self.outputs: tuple = ()
        self.lr_tensors: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> tuple:
        self.calls += 1
        if self.graph is None and self.calls <= self.eager_steps:
            return self._eager(batch)
        if self.graph is None:
            self._capture(batch)
        elif batch.shape != self.static_batch.shape or batch.dtype != self.static_batch.dtype:
            raise TinyLlamaError(
                f"a CUDA-graphed step takes batches of one shape: captured {tuple(self.static_batch.shape)} "
                f"{self.static_batch.dtype}, got {tuple(batch.shape)} {batch.dtype}; turn the graph off for "
                "varying batches")
        else:
            self.static_batch.copy_(batch, non_blocking=True)
        for t, group in zip(self.lr_tensors, self.optimizer.param_groups):
            t.fill_(group["lr"])  # a kernel with the value as argument: no host-to-device copy, no sync
        self._refresh_copies()
        self.graph.replay()
        return self.outputs

    def _eager(self, batch: torch.Tensor) -> tuple:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(batch)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _refresh_copies(self) -> None:
        # The optimizer's compute-dtype weight copies (`kernels.weight_copies`): a replay reads them without the
        # forward's Python check, so a weight changed between replays (a checkpoint load) is re-cast here first.
        copies = getattr(self.optimizer, "copies", None)
        if copies is not None:
            copies.refresh()

    def _capture(self, batch: torch.Tensor) -> None:
        self._refresh_copies()  # a stale copy cast inside the capture would be cast again by every replay
        self.static_batch = batch.detach().clone()
        self.optimizer.zero_grad(set_to_none=True)  # gradients born in the graph's pool, written by each replay
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        self.lr_tensors = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=batch.device) for g in groups]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks back to the driver: the graph has its own pool
        try:
            for g, lr in zip(groups, self.lr_tensors):
                g["lr"], g["capturable"] = lr, True  # capturable: torch's check that a step may be captured
            # thread_local: only this thread's work is checked, so a loader's pinning thread may go on
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.fn(self.static_batch)
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        self.graph = graph
