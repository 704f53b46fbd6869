"""Held-out windows and keep-best selection, shared by SAFE and joint windows.

Some calibration windows are kept out of the optimisation; the candidates a solver offers (its
warm start, each epoch's result, the trained result) are scored on them by the relative error
``||f(X) - Y||^2 / ||Y||^2`` and the best is kept, so the solver never returns something worse
on data it did not train on than the best it was offered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def split_windows(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[n - k]`` of the windows trained on and ``[k]`` of those held out: the last
    ``k = round(fraction * n)``, at least one when ``fraction > 0``, never all of them (the
    calibration windows are a seeded random draw, so their last ones are a random subset and
    the split needs no seed of its own)."""
    count = min(max(round(fraction * n), 1), n - 1) if fraction else 0
    return torch.arange(n - count), torch.arange(n - count, n)


@torch.no_grad()
def relative_error(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    indices: torch.Tensor,
    batch_size: int,
) -> float:
    """``||forward(X) - Y||^2 / ||Y||^2`` over the windows ``indices``, ``batch_size`` at a time;
    ``batch(part)`` gives a part's inputs and targets ``[b, seq, d]`` on the device. fp32, no
    autocast: the same on every rank."""
    num = den = 0.0
    for part in indices.split(batch_size):
        x, y = batch(part)
        out = forward(x.float()).float()
        num += float((out - y.float()).square().sum())
        den += float(y.float().square().sum())
    return num / max(den, 1e-30)


class KeepBest:
    """The best of the candidates offered so far by their held-out error.

    :meth:`offer` takes a candidate's error, a label (an epoch, a name) and its state (any
    value the caller can restore from: a state dict, a callable); a candidate replaces the best
    only when its error is strictly lower, so on a tie the earlier one (the warm start) stays.
    """

    def __init__(self) -> None:
        self.error = float("inf")
        self.label = None
        self.state = None
        self.offered = 0

    def offer(self, error: float, label, state=None) -> bool:
        """Record a candidate; return whether it is the new best (the first always is)."""
        self.offered += 1
        if self.offered == 1 or error < self.error:
            self.error, self.label, self.state = error, label, state
            return True
        return False
