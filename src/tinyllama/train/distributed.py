"""Process group, device and parallelism, all applied from outside the model.

Single process (CPU or one GPU) needs no process group. Under `torchrun`, every Block and then the
root are wrapped with FSDP2 (`fully_shard`): full sharding inside a node and, when the run spans
several nodes, replication across them (HSDP on a 2-D (replicate, shard) device mesh), as TinyLlama v1.1
trained. Activation checkpointing and `torch.compile` apply per Block.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from tinyllama.checks import check_device
from tinyllama.errors import TinyLlamaError
from tinyllama.host_allocator import keep_freed_host_memory


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Read torchrun's environment, pick the device and (when WORLD_SIZE > 1) start the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(check_device(device, "train.device"))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        allocator = keep_freed_host_memory()  # a CPU step re-faulted all its memory every step (host_allocator.py)
        if rank == 0 and allocator.startswith(("glibc", "mallopt")):
            print(f"note: the host allocator is glibc's default ({allocator}), so every CPU step faults its memory "
                  f"in again (LD_PRELOAD jemalloc or tcmalloc, or glibc ≥ 2.35, avoids that)", file=sys.stderr)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world_size, local_rank, local_world_size, dev)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_(t: torch.Tensor, info: DistInfo, op=None) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def build_mesh(info: DistInfo, hsdp_replicas: Optional[int]):
    """1-D mesh (full sharding) on one node; 2-D (replicate, shard) mesh for HSDP across nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    replicas = hsdp_replicas if hsdp_replicas is not None else info.num_nodes
    if replicas < 1 or info.world_size % replicas:
        raise TinyLlamaError(
            f"train.hsdp_replicas ({replicas}) must be >= 1 and divide the world size ({info.world_size})"
        )
    dev_type = info.device.type
    if replicas == 1:
        return init_device_mesh(dev_type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(dev_type, (replicas, info.world_size // replicas), mesh_dim_names=("replicate", "shard"))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each Block's activations in backward (keeps parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    # Per block (all identical, compiled once), in place so parameter names stay the same.
    for block in model.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: nn.Module, info: DistInfo, param_dtype: Optional[torch.dtype], hsdp_replicas: Optional[int],
               reshard_after_forward: bool = True, reduce_dtype: torch.dtype = torch.float32):
    """FSDP2: shard every Block, then the root (embeddings, final norm, head). fp32 master weights always."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(info, hsdp_replicas)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block is all-gathered again at once by the root's backward: keep it unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return mesh
