"""Joint reconstruction of a window of consecutive pruned blocks, their masks frozen.

After the method has pruned blocks ``s..e`` one at a time, the window is trained as one unit
on the local objective of the whole window::

    min_W  mean || window(X_s; W) - T ||^2,     T = dense window(X_s)

``X_s`` ``[n, seq, d]`` is the pruned stream entering block ``s`` and ``T`` the dense blocks
``s..e`` applied to it (the engine builds ``T`` block by block before pruning each one). An
error made in block ``s`` can then be compensated in block ``s+1``, which block-by-block
reconstruction cannot do (Shin et al. 2024 reconstruct several blocks jointly).

Adam (0.9/0.95) trains every parameter of the window; the pruned matrices keep their exact
zeros (set to +0.0 again after every step). Steps are relative, as SAFE's:
``lr`` is a fraction of each tensor's RMS per step, decaying linearly to 0; bf16 autocast
where the device computes it natively, fp32 master weights. Of the window before and after
training, the one with the lower error on the held-out windows is kept, so the stage never
makes the window worse on data it did not train on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from safe_llm.core import precision
from safe_llm.core.capture import BlockSpan
from safe_llm.errors import SafeLLMError
from safe_llm.stages.prune.options import PruneOptions
from safe_llm.train import holdout, relative_adam
from safe_llm.train.data_parallel import mse_loss_and_grads

log = logging.getLogger(__name__)


class NonFiniteJointLossError(SafeLLMError):
    """A window's loss turned NaN/Inf: the run stops before the window is saved."""


@dataclass
class Window(BlockSpan):
    """Blocks ``first..first + len(blocks) - 1`` (a :class:`BlockSpan`): ``inputs`` is the
    pruned stream that enters the first, ``targets`` the dense window's outputs on it, both
    ``[n, seq, d]`` and possibly off ``device``."""

    first: int
    pruned: list[nn.Parameter]  # the pruned weights, whose zeros stay zeros
    non_blocking: ClassVar[bool] = False  # the window's batches were always blocking copies

    def error(self, indices: torch.Tensor, batch_size: int) -> float:
        """Relative error ``||window(X) - T||^2 / ||T||^2`` on the windows ``indices``
        (:func:`~safe_llm.train.holdout.relative_error`)."""
        return holdout.relative_error(self.forward, self.batch, indices, batch_size)


def reconstruct(window: Window, options: PruneOptions, seed: int) -> dict[str, float]:
    """Train the window in place (masks frozen) and keep the better of before and after on
    the held-out windows; return the window's errors for the report."""
    home = [p.dtype for p in window.parameters()]
    for block in window.blocks:
        block.float()  # fp32 master weights
    try:
        return _reconstruct(window, options, seed)
    finally:
        for p, dtype in zip(window.parameters(), home, strict=True):
            p.data = p.data.to(dtype)


def _reconstruct(window: Window, options: PruneOptions, seed: int) -> dict[str, float]:
    train, held = holdout.split_windows(window.inputs.shape[0], options.holdout)
    check = held if len(held) else train
    best = holdout.KeepBest()
    before = {
        i: {k: v.clone() for k, v in b.state_dict().items()} for i, b in enumerate(window.blocks)
    }
    error_before = window.error(check, options.batch_size)
    best.offer(error_before, "the block-by-block result", before)
    loss = _train(window, options, train, seed)
    error_after = window.error(check, options.batch_size)
    kept = best.offer(error_after, "the trained window")
    if not kept:
        for index, block in enumerate(window.blocks):
            block.load_state_dict(before[index])
    last = window.first + len(window.blocks) - 1
    log.info(
        "joint reconstruction of blocks %d-%d: %s error %.4g -> %.4g, keeping %s",
        window.first,
        last,
        "held-out" if len(held) else "training",
        error_before,
        error_after,
        best.label,
    )
    return {
        "joint_first_block": float(window.first),
        "joint_error_before": error_before,
        "joint_error_after": error_after,
        "joint_kept": float(kept),
        "joint_loss": loss,
    }


def _train(window: Window, options: PruneOptions, train: torch.Tensor, seed: int) -> float:
    """Adam on the window's parameters over ``train``; returns the last epoch's mean loss."""
    params = window.parameters()
    masked = [(weight, relative_adam.pruned_mask(weight)) for weight in window.pruned]
    units = relative_adam.step_units(params, where=f"joint window from block {window.first}")
    optimizer = relative_adam.adam(relative_adam.trainable_groups(params, units), options.lr)
    steps_per_epoch = math.ceil(len(train) / options.batch_size)
    schedule = relative_adam.LinearSchedule(
        options.lr, int(round(options.epochs * steps_per_epoch))
    )
    bf16 = precision.reduced_precision(options.autocast, window.device, "joint autocast")
    generator = torch.Generator().manual_seed(seed)
    step, loss_sum, loss_count = 0, torch.zeros((), device=window.device), 0
    while step < schedule.total:
        order = train[torch.randperm(len(train), generator=generator)]
        loss_sum, loss_count = loss_sum.zero_(), 0
        for batch in order.split(options.batch_size):
            if step == schedule.total:
                break
            loss, grads = mse_loss_and_grads(
                window.forward, window.batch, params, batch, bf16, window.device
            )
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            schedule.apply(optimizer, step)
            relative_adam.masked_step(optimizer, masked)
            loss_sum += loss
            loss_count += 1
            step += 1
        mean = float(loss_sum) / max(loss_count, 1)
        if not math.isfinite(mean):
            raise NonFiniteJointLossError(
                f"joint reconstruction of the window from block {window.first}: the loss "
                f"became {mean}; nothing of the run was saved. Lower --joint-lr"
            )
    relative_adam.release(params)
    return mean
