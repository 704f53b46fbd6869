"""Statistics of the inputs each prunable layer sees, gathered in one pass over a block.

Wanda and SAFE+ need the per-feature norms ``||X_j||_2``; SparseGPT (and the layer-error
report) needs the Hessian ``H = 2 X^T X / n``. Layers fed the same tensor (q/k/v, gate/up)
share one accumulator. The experts of a mixture-of-experts block are measured each on the
tokens routed to it (:mod:`safe_llm.core.moe`); an expert that receives none gets the fallback of
:meth:`InputStats.fallback`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from safe_llm.core import moe
from safe_llm.core.blocks import PrunableMatrix, as_matrix_handle

log = logging.getLogger(__name__)


class InputStats:
    """Running sums over calibration tokens for one layer input of width ``d``."""

    def __init__(self, width: int, device: torch.device, hessian: bool):
        self.tokens = 0
        self.sq_sum = torch.zeros(width, device=device, dtype=torch.float32)
        self.xtx = torch.zeros(width, width, device=device) if hessian else None
        self.is_fallback = False

    @classmethod
    def fallback(cls, width: int, device: torch.device, hessian: bool) -> InputStats:
        """The statistics given to an expert that received no calibration token: unit norms and
        ``H = 2 I``, so Wanda and SAFE+ score it by ``|W|`` and SparseGPT prunes it by ``|W|``
        without an update (magnitude pruning: nothing is known of its inputs)."""
        stats = cls(width, device, hessian)
        stats.tokens, stats.is_fallback = 1, True
        stats.sq_sum.fill_(1.0)
        if stats.xtx is not None:
            stats.xtx.copy_(torch.eye(width, device=device))
        return stats

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
    layers: dict[str, PrunableMatrix | nn.Module],
    run_batches: Callable[[], Iterable],
    hessian: bool,
    every_token: bool = False,
) -> dict[str, InputStats]:
    """Hook ``layers``, call ``run_batches()`` (which runs the block over its inputs), unhook.

    Returns one :class:`InputStats` per layer name; layers that receive the same tensor share
    the object. An expert's matrix gets the statistics of the tokens the router sends to it
    (with ``every_token``: of every token), or :meth:`InputStats.fallback` when none came.
    """
    layers = {n: as_matrix_handle(n, h) for n, h in layers.items()}
    linear = {n: h for n, h in layers.items() if h.expert is None}
    experts = {n: h for n, h in layers.items() if h.expert is not None}
    stats: dict[str, InputStats] = {}
    owner: dict[str, str] = {}
    # keyed by storage address; holding the tensor keeps the address from being reused
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    handles = [
        h.module.register_forward_hook(_hook(n, stats, owner, seen, hessian))
        for n, h in linear.items()
    ]
    try:
        with _expert_capture(experts, stats, hessian, every_token):
            for _ in run_batches():
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in linear.items():
        if name not in owner:  # never called by the block's forward: no inputs seen
            log.warning("layer %s received no inputs during calibration", name)
            stats[name] = InputStats(_in_features(layer), layer.weight.device, hessian)
            owner[name] = name
    result = {name: stats[owner[name]] for name in linear}
    for name, layer in experts.items():
        result[name] = stats[name] if stats[name].tokens else _fallback(name, layer, hessian)
    return {name: result[name] for name in layers}


def _hook(name: str, stats: dict, owner: dict, seen: dict, hessian: bool):
    """A linear layer's forward hook: its inputs into ``stats[name]``, or into the
    statistics of the first layer that received the same tensor."""

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


def _expert_capture(
    experts: dict[str, PrunableMatrix], stats: dict, hessian: bool, every_token: bool
) -> contextlib.AbstractContextManager:
    """The context that feeds each expert matrix's inputs into ``stats[name]``."""
    if not experts:
        return contextlib.nullcontext()
    sinks = {}
    for name, handle in experts.items():
        stats[name] = InputStats(handle.matrix().shape[1], handle.param.device, hessian)
        sinks[(id(handle.param), handle.expert)] = stats[name].add
    capture = moe.ExpertInputs(sinks)
    for handle in experts.values():
        capture.watch(handle.param)
    modules = moe.expert_modules(experts)
    stack = contextlib.ExitStack()
    stack.enter_context(moe.CheckedExperts(capture, modules))
    stack.enter_context(moe.eager_experts(modules))
    if every_token:
        stack.enter_context(moe.every_token(capture, modules))
    stack.enter_context(capture)
    return stack


def _fallback(name: str, layer: PrunableMatrix, hessian: bool) -> InputStats:
    log.warning("expert matrix %s received no calibration token: pruned by |W|", name)
    return InputStats.fallback(layer.matrix().shape[1], layer.param.device, hessian)


def _in_features(layer: PrunableMatrix) -> int:
    return layer.matrix().shape[1]
