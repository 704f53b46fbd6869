"""The one interface every pruning method implements: :class:`PruningMethod`, which prunes a
block given its :class:`BlockContext`.

This module imports nothing of the engine: a method needs only this file (and the sparsity
patterns, the layer statistics and the block helpers it hands over).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from safe_llm.core.blocks import PrunableMatrix, as_matrix_handle
from safe_llm.core.capture import BlockCall, BlockSpan
from safe_llm.core.layer_stats import InputStats
from safe_llm.core.sparsity import SparsityPattern


@dataclass(init=False)
class BlockContext(BlockSpan):
    """Everything a method may use to prune one block: a :class:`BlockSpan` of ``block``
    alone, with its recorded ``call``.

    ``inputs`` and ``targets`` are ``[n, seq, d]`` and may live off the compute device;
    ``batch`` and ``batches`` give device copies, ``forward`` runs the block on them.
    ``stats`` holds the dense block's layer-input statistics.
    ``pattern`` is the pattern every matrix of ``layers`` must meet; it counts per row when
    the method says so (:attr:`PruningMethod.per_row`). ``layers`` maps each prunable matrix's
    name to its handle: a linear layer's weight (``mlp.down_proj``) or one expert's matrix of a
    fused expert parameter (``mlp.experts.gate_up_proj[3]``); every one is pruned on its own
    and has its own ``stats`` (an expert's: from the tokens routed to it).
    """

    index: int
    layers: dict[str, PrunableMatrix]
    pattern: SparsityPattern
    stats: dict[str, InputStats]
    batch_size: int
    seed: int

    def __init__(
        self,
        index: int,
        block: nn.Module,
        layers: dict[str, PrunableMatrix | nn.Module],
        pattern: SparsityPattern,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        call: BlockCall,
        stats: dict[str, InputStats],
        device: torch.device,
        batch_size: int,
        seed: int,
    ):
        super().__init__([block], [call], inputs, targets, device)
        self.index, self.pattern, self.stats = index, pattern, stats
        self.batch_size, self.seed = batch_size, seed
        # linear layers given as modules become their weights' handles
        self.layers = {name: as_matrix_handle(name, layer) for name, layer in layers.items()}

    @property
    def block(self) -> nn.Module:
        return self.blocks[0]

    @property
    def call(self) -> BlockCall:
        return self.calls[0]

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Device batches of ``batch_size`` windows (default the run's ``batch_size``)."""
        return super().batches(self.batch_size if batch_size is None else batch_size)

    def matrix(self, name: str) -> torch.Tensor:
        """Layer ``name``'s weight as an ``[out, in]`` view, whatever its storage (GPT-2's
        ``Conv1D`` stores ``[in, out]``): reading it reads the weight, writing into it
        (``ctx.matrix(name).copy_(pruned)``) writes the weight."""
        return self.layers[name].matrix()

    def as_matrix(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """A tensor laid out like layer ``name``'s weight (a copy, a gradient, an optimiser
        state), or like the whole fused parameter it lives in, as an ``[out, in]`` view."""
        return self.layers[name].matrix(stored)


@dataclass
class NoOptions:
    """A method without hyperparameters."""


class PruningMethod:
    """Prunes one transformer block in place.

    Subclasses set ``name`` (the ``--method`` value), ``Options`` (a dataclass whose fields
    become CLI flags and recipe keys; each field's ``metadata["help"]`` is its help text) and
    implement :meth:`prune_block`. ``needs_hessian`` asks the engine for ``2 X^T X / n`` per
    layer; ``per_row`` says the method keeps the pattern's count in every output row (Wanda's
    comparison group) rather than over the whole matrix, and ``ctx.pattern`` then counts per
    row. Registration is by the ``@register`` decorator of :mod:`safe_llm.methods`.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs_hessian: ClassVar[bool] = False
    per_row: ClassVar[bool] = False

    def __init__(self, options: object | None = None):
        self.options = options if options is not None else self.Options()

    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        """Make every layer in ``ctx.layers`` meet ``ctx.pattern``; return extra metrics."""
        raise NotImplementedError
