"""Statistics of the inputs each prunable layer sees, gathered in one pass over a block.

Wanda and SAFE+ need the per-feature norms ``||X_j||_2``; SparseGPT (and the layer-error
report) needs the Hessian ``H = 2 X^T X / n``. Layers fed the same tensor (q/k/v, gate/up)
share one accumulator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


class InputStats:
    """Running sums over calibration tokens for one layer input of width ``d``."""

    def __init__(self, width: int, device: torch.device, hessian: bool):
        self.tokens = 0
        self.sq_sum = torch.zeros(width, device=device, dtype=torch.float32)
        self.xtx = torch.zeros(width, width, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``[..., d]``."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_sum += x.square().sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens, ``[d]``."""
        return self.sq_sum.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n``, ``[d, d]`` (SparseGPT's normalisation)."""
        if self.xtx is None:
            raise RuntimeError("Hessian was not collected for this layer")
        return self.xtx * (2.0 / max(self.tokens, 1))


@torch.no_grad()
def collect_input_stats(
    layers: dict[str, nn.Module],
    run_batches: Callable[[], Iterable],
    hessian: bool,
) -> dict[str, InputStats]:
    """Hook ``layers``, call ``run_batches()`` (which runs the block over its inputs), unhook.

    Returns one :class:`InputStats` per layer name; layers that receive the same tensor share
    the object.
    """
    stats: dict[str, InputStats] = {}
    owner: dict[str, str] = {}
    # keyed by storage address; holding the tensor keeps the address from being reused
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            x = inputs[0]
            if name not in owner:
                key = (x.data_ptr(), tuple(x.shape))
                owner[name] = seen.setdefault(key, (name, x))[0]
            if owner[name] != name:
                return
            if name not in stats:
                stats[name] = InputStats(x.shape[-1], x.device, hessian)
            stats[name].add(x)

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for _ in run_batches():
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        if name not in owner:  # never called by the block's forward: no inputs seen
            log.warning("layer %s received no inputs during calibration", name)
            device = layer.weight.device
            stats[name] = InputStats(_in_features(layer), device, hessian)
            owner[name] = name
    return {name: stats[owner[name]] for name in layers}


def _in_features(layer: nn.Module) -> int:
    from safe_llm.blocks import weight_matrix

    return weight_matrix(layer).shape[1]
