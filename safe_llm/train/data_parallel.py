"""The data-parallel loss: each rank takes its share of a batch, and the sums over ranks are the
whole batch's mean (:mod:`safe_llm.core.distributed`; one process: no-ops)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from safe_llm.core import distributed, precision


def mse_loss_and_grads(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    params: list[torch.Tensor],
    indices: torch.Tensor,
    bf16: bool,
    device: torch.device,
    micro_batches: int = 1,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mean squared error of ``forward`` on the windows ``indices`` ``[b]`` against their
    targets and its gradients with respect to ``params``, the same on every rank.

    ``batch(part)`` gives a part's inputs and targets ``[b', seq, d]`` on ``device``. The
    windows are taken in ``micro_batches`` consecutive chunks (gradient accumulation), each
    with its own targets; each rank computes its share ``rank::world`` of every chunk, scaled
    by the whole batch's element count, and the sums are all-reduced. ``bf16``: autocast of the
    forward (fp32 master weights and loss)."""
    total_loss = torch.zeros((), device=device)
    grads = None
    for micro in indices.chunk(micro_batches):
        local = distributed.shard(micro)
        if len(local) == 0:
            continue
        x, y = batch(local)
        with precision.bf16_autocast(device, bf16):
            out = forward(x.float())
        count = len(micro) * y[0].numel() * micro_batches
        loss = nn.functional.mse_loss(out.float(), y.float(), reduction="sum") / count
        step_grads = torch.autograd.grad(loss, params)
        grads = (
            step_grads if grads is None else [a + b for a, b in zip(grads, step_grads, strict=True)]
        )
        total_loss += loss.detach()
    grads = list(grads) if grads is not None else [torch.zeros_like(p) for p in params]
    distributed.all_reduce_sum_([total_loss, *grads])
    return total_loss, grads


def sum_over_ranks(value: float, device: torch.device) -> float:
    """``value`` summed over every rank (a rank's share of a batch's mean loss gives the
    batch's mean); itself in one process."""
    if not distributed.active():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    distributed.all_reduce_sum_([total])
    return float(total)
