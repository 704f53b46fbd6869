"""Relative Adam: the step units, the learning-rate schedule and the masked step that SAFE,
joint windows and recovery share.

* **Units.** Each trainable tensor steps in its own unit ``s``: its RMS when it starts
  (relative steps; an all-zero tensor, such as a bias initialised to zeros, has no scale of
  its own and takes the mean RMS of the others), or 1 (absolute steps). Its Adam group's
  learning rate is ``lr * s``, so ``lr`` is a fraction of each tensor's size per step and a
  function-preserving rescaling of the weights changes no step in these units.
* **Schedule.** Linear warm-up over ``warmup`` steps, ``lr * (step + 1) / warmup`` (the
  ramp reaches ``lr`` at step ``warmup - 1``), then linear decay
  ``lr * (total - step) / (total - warmup)``; ``warmup`` is capped at ``total - 1``.
* **Masked step.** The pruned entries of a weight (a bool mask, True where pruned, or its
  :class:`~safe_llm.train.masked_adam.BitMask`) get a zero gradient and are set to +0.0 again
  after the step (Adam is elementwise: what it does there never reaches a kept entry).
  :class:`~safe_llm.train.masked_adam.MaskedAdam`, the packed state recovery uses by default,
  keeps no state for them at all and takes the same groups.

Adam here is ``torch.optim.Adam`` with betas 0.9/0.95 and no weight decay, one group per tensor
(``{"params": [p], "unit": s}``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from safe_llm.train.masked_adam import BitMask

log = logging.getLogger(__name__)

BETAS = (0.9, 0.95)


@torch.no_grad()
def step_units(
    params: Iterable[torch.Tensor],
    relative: bool = True,
    where: str = "",
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """The step unit of each tensor of ``params``: its RMS with ``relative`` steps (the mean RMS
    of the others for an all-zero tensor, 1 when all are zero; logged, naming ``where``), else
    1. ``whole`` maps a tensor to the whole tensor its RMS is measured on (FSDP gathers a
    shard's full parameter: one at a time)."""
    params = list(params)
    if not relative:
        return [1.0] * len(params)
    view = whole or (lambda t: t)
    rms = [float(view(p.detach()).float().square().mean().sqrt()) for p in params]
    nonzero = [r for r in rms if r > 0]
    if len(nonzero) == len(rms):
        return rms
    fill = sum(nonzero) / max(len(nonzero), 1) or 1.0
    log.warning(
        "%s: %d tensor(s) are all zeros; their step unit is the mean RMS %.3g",
        where or "relative steps",
        len(rms) - len(nonzero),
        fill,
    )
    return [r if r > 0 else fill for r in rms]


def trainable_groups(params: list[torch.Tensor], units: list[float]) -> list[dict]:
    """One Adam group per tensor with its ``unit``; the tensors start needing gradients."""
    for p in params:
        p.requires_grad_(True)
    return [{"params": [p], "unit": u} for p, u in zip(params, units, strict=True)]


def adam(groups: list[dict], lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` (0.9/0.95, no weight decay) over :func:`trainable_groups`."""
    return torch.optim.Adam(groups, lr=lr, betas=BETAS, weight_decay=0.0)


class LinearSchedule:
    """Linear warm-up then linear decay of a peak learning rate ``lr`` over ``total`` steps
    (module docstring); :meth:`apply` sets every group's rate ``rate(step) * unit``."""

    def __init__(self, lr: float, total: int, warmup: int = 0):
        self.base_lr, self.total = lr, max(total, 1)
        self.warmup = max(min(warmup, self.total - 1), 0)

    def rate(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        return self.base_lr * max(self.total - step, 0) / max(self.total - self.warmup, 1)

    def apply(self, optimizer, step: int) -> None:
        """Set each group's ``lr`` for step ``step`` (groups carry their ``unit``)."""
        rate = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = rate * group["unit"]


def pruned_mask(weight: torch.Tensor) -> torch.Tensor:
    """The frozen zeros of a pruned weight: a bool tensor, True where the weight is 0."""
    return weight.detach() == 0


def _unpacked(mask: torch.Tensor | BitMask) -> torch.Tensor:
    return mask.unpack() if isinstance(mask, BitMask) else mask


@torch.no_grad()
def mask_grads_(masked: Iterable[tuple[torch.Tensor, torch.Tensor | BitMask]]) -> None:
    """Zero the gradient of every pruned entry: ``masked`` holds ``(weight, pruned mask)``."""
    for weight, pruned in masked:
        if weight.grad is not None:
            weight.grad.masked_fill_(_unpacked(pruned), 0.0)


@torch.no_grad()
def zero_pruned_(masked: Iterable[tuple[torch.Tensor, torch.Tensor | BitMask]]) -> None:
    """Set every pruned entry to +0.0 (never -0.0, which a product by 0 may leave)."""
    for weight, pruned in masked:
        weight.masked_fill_(_unpacked(pruned), 0.0)


def masked_step(optimizer, masked: list[tuple[torch.Tensor, torch.Tensor | BitMask]]) -> None:
    """One step of ``optimizer`` from the gradients in ``.grad``, the pruned entries of
    ``masked`` (``(weight, pruned mask)`` pairs) frozen at +0.0."""
    mask_grads_(masked)
    optimizer.step()
    zero_pruned_(masked)


def release(params: Iterable[torch.Tensor]) -> None:
    """The end of training: the tensors stop needing gradients, theirs are dropped."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None
