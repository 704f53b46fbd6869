"""Fully sharded recovery: the decoder blocks' weights, gradients and Adam state split over
the ranks of a ``torchrun`` launch (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Data-parallel recovery keeps the whole student, its gradients and its Adam state on every
device; a model whose weights and optimiser state do not fit one device needs them sharded.
Within :func:`sharded_blocks` the model's decoder blocks are replaced by ``fully_shard``-ed
copies: each parameter is a ``DTensor`` cut along its first dimension, gathered block by
block for the forward and backward, and its gradient reduce-scattered (summed, since each
rank's loss is already its share of the batch mean). Embeddings, ``lm_head`` and the final
norm stay whole on every rank (frozen, or small). On leaving the context the trained weights
are gathered back into the original blocks, which are put back in place.

The original blocks stay where they are (on the host): only the shards go to the device.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from safe_llm.core import distributed
from safe_llm.core.blocks import find_blocks
from safe_llm.core.capture import non_block_modules_to
from safe_llm.errors import SafeLLMError

NEEDS_RANKS = (
    "--recover-fsdp shards the model over several processes: launch the command with "
    "torchrun --nproc-per-node N (N >= 2)"
)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a whole tensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank: a collective) or ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``tensor`` (``tensor`` itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@contextlib.contextmanager
def sharded_blocks(
    model: nn.Module, device: torch.device, on: bool = True, keep: bool = True
) -> Iterator[None]:
    """Within the context, ``model``'s decoder blocks are FSDP-sharded copies on ``device``
    and the rest of the model is on ``device``. On a normal exit with ``keep`` the trained
    weights are copied back into the original blocks; the originals are always restored.
    Does nothing unless ``on``."""
    if not on:
        yield
        return
    if not distributed.active():
        raise SafeLLMError(NEEDS_RANKS)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    prefix, blocks = find_blocks(model)
    owner_name, _, attribute = prefix.rpartition(".")
    owner = model.get_submodule(owner_name)
    non_block_modules_to(model, blocks, device)
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    shards = nn.ModuleList()
    for block in blocks:
        twin = copy.deepcopy(block)  # one block on the host at a time; its shards go to device
        fully_shard(twin, mesh=mesh)
        twin.set_gradient_divide_factor(1.0)  # each rank's loss is already its share: sum
        twin.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        shards.append(twin)
    setattr(owner, attribute, shards)
    try:
        yield
        if keep:
            _gather_into(blocks, shards)
    finally:
        setattr(owner, attribute, blocks)


@torch.no_grad()
def _gather_into(blocks: nn.ModuleList, shards: nn.ModuleList) -> None:
    """Copy every sharded parameter's whole tensor into the same parameter of ``blocks``."""
    for block, twin in zip(blocks, shards, strict=True):
        gathered = dict(twin.named_parameters())
        for name, param in block.named_parameters():
            param.copy_(full(gathered[name]).to(param.device))
