"""Wanda (Sun et al., 2023): score ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

import torch

from safe_llm.methods import register
from safe_llm.methods.base import BlockContext, PruningMethod


@register
class Wanda(PruningMethod):
    name = "wanda"
    per_row = True  # ctx.pattern counts each output row

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        for name in ctx.layers:
            weight = ctx.matrix(name)
            weight.copy_(ctx.pattern.project(weight, ctx.stats[name].norms))
        return {}
