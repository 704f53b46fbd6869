"""SparseGPT (Frantar & Alistarh, 2023): blocked OBS reconstruction with adaptive masks.

Per layer, with ``H = 2 X^T X / n + damping * mean(diag H) * I``, columns are processed in
blocks of ``blocksize``; inside a block the mask is chosen by the OBS saliency
``w^2 / [H^-1]_jj^2`` and each pruned weight's error is spread over the not-yet-processed
columns through the upper Cholesky factor of ``H^-1``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from safe_llm.core.sparsity import SparsityPattern
from safe_llm.methods import register
from safe_llm.methods.base import BlockContext, PruningMethod
from safe_llm.options import check_fields, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = option(128, "SparseGPT: columns per OBS block", at_least=1)
    damping: float = option(
        0.01, "SparseGPT: Hessian damping as a fraction of mean diag", at_least=0
    )

    def __post_init__(self):
        check_fields(self)


def inverse_hessian_factor(hessian: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) I)^-1``, ``[d, d]``.

    When the factorisation fails the damping is raised tenfold (from at least 0.01) up to five
    times, each time with a ``RuntimeWarning``; after that a ``RuntimeError`` names the layer.
    """
    mean_diag = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(hessian + damping * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        if attempt == 5:
            break
        raised = max(damping * 10, 0.01)
        warnings.warn(
            f"SparseGPT: Cholesky failed for {name} at damping {damping:g}; "
            f"raising the damping to {raised:g}",
            RuntimeWarning,
            stacklevel=2,
        )
        damping = raised
    raise RuntimeError(f"SparseGPT: Hessian of {name} is not positive definite even with damping")


def _block_keep_counts(pattern: SparsityPattern, rows: int, cols: int, blocksize: int) -> list[int]:
    """Pruned entries per column block, summing exactly to the matrix's pruned count."""
    pruned_total = rows * cols - pattern.kept_count(rows * cols)
    edges = list(range(0, cols, blocksize)) + [cols]
    cut = [round(pruned_total * e / cols) for e in edges]
    return [b - a for a, b in zip(cut, cut[1:], strict=False)]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    blocksize: int = 128,
    damping: float = 0.01,
    name: str = "layer",
) -> torch.Tensor:
    """Return the pruned ``[out, in]`` weight (float32) for inputs with Hessian ``[in, in]``."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    H = hessian.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, damping, name)
    rows, cols = W.shape
    if pattern.is_nm:  # an N:M group must not straddle two column blocks
        blocksize = -(-blocksize // pattern.m) * pattern.m
    pruned_per_block = _block_keep_counts(pattern, rows, cols, blocksize)
    for block_index, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        saliency = W1.square() / torch.diagonal(Hinv1).square().unsqueeze(0)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:
            k = pruned_per_block[block_index]
            if k:
                prune.view(-1)[saliency.flatten().topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m].square() / torch.diagonal(Hinv1)[
                    i : i + pattern.m
                ].square().unsqueeze(0)
                drop = group.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                prune[:, i : i + pattern.m].scatter_(1, drop, True)
            w = W1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    Options = SparseGPTOptions
    needs_hessian = True

    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        for name in ctx.layers:
            weight = ctx.matrix(name)
            pruned = sparsegpt_prune(
                weight,
                ctx.stats[name].hessian,
                ctx.pattern,
                blocksize=self.options.blocksize,
                damping=self.options.damping,
                name=f"block {ctx.index} {name}",
            )
            with torch.no_grad():
                weight.copy_(pruned.to(weight.dtype))
        return {}
