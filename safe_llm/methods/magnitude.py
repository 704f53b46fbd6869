"""Magnitude pruning: keep the largest ``|W|`` per matrix (or per N:M group)."""

from __future__ import annotations

import torch

from safe_llm.methods import register
from safe_llm.methods.base import BlockContext, PruningMethod


@register
class Magnitude(PruningMethod):
    name = "magnitude"

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        for name in ctx.layers:
            weight = ctx.matrix(name)
            weight.copy_(ctx.pattern.project(weight))
        return {}
