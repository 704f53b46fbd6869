"""Data parallelism across processes started by ``torchrun`` or ``accelerate launch``.

Every rank runs the whole engine on the same calibration windows (the block forwards, the
statistics and the one-shot methods are cheap and identical everywhere); the SAFE solver
shards each optimisation batch across ranks and all-reduces the losses and gradients, so every
rank takes the same Adam step and holds the same weights. Rank 0 alone writes. Every helper
here is a no-op in a single process (``torch.distributed`` not initialised).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group a launcher described in the environment (``WORLD_SIZE`` > 1):
    NCCL when CUDA is available, else gloo. Returns whether this run is data-parallel."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return active()


def local_device(device: torch.device) -> torch.device:
    """With several ranks on CUDA, rank ``LOCAL_RANK``'s own GPU; otherwise ``device``."""
    if device.type != "cuda" or not active() or device.index is not None:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share ``indices[rank::world]`` of a batch of window indices ``[b]``."""
    return indices[rank() :: world_size()] if active() else indices


@torch.no_grad()
def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over all ranks in place (one flat all-reduce per dtype)."""
    if not active() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        pieces = flat.split([t.numel() for t in group])
        torch._foreach_copy_(group, [p.view_as(t) for p, t in zip(pieces, group, strict=True)])


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
