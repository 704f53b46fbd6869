"""Sparsity profiles over the decoder blocks: uniform, explicit (``sparsity_per_block``) or
OWL (outlier-weighted layerwise sparsity, Yin et al. 2023).

OWL takes a dense pass of the calibration windows through every block (:func:`dense_pass`,
on the block walker of :mod:`safe_llm.core.walker`), scores each block's outlier ratio from the Wanda scores
``|W_ij| ||X_j||`` and spreads the sparsity linearly over ``target -/+ lambda``, blocks with
more outliers keeping more weights, the overall sparsity staying the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.core.layer_stats import InputStats, collect_input_stats
from safe_llm.core.sparsity import PatternError
from safe_llm.core.walker import (
    BlockSource,
    ResidentBlocks,
    WalkOptions,
    block_on_device,
    captured_inputs,
    forward_batches,
)
from safe_llm.options import ConfigError
from safe_llm.stages.base import RunContext
from safe_llm.stages.profile.options import ProfileOptions

log = logging.getLogger(__name__)

T = TypeVar("T")


def weighted_sparsity(sparsities: list[float], sizes: list[int]) -> float:
    """Overall sparsity of blocks with ``sizes`` prunable weights pruned at ``sparsities``."""
    total = sum(sizes)
    return sum(s * n for s, n in zip(sparsities, sizes, strict=True)) / max(total, 1)


@torch.no_grad()
def outlier_ratio(weights: list[torch.Tensor], norms: list[torch.Tensor], m: float) -> float:
    """OWL's layer-wise outlier ratio of one block (Yin et al. 2023).

    ``weights[k]`` ``[out, in]`` and ``norms[k]`` ``[in]`` (``||X_j||``) give the Wanda scores
    ``|W_ij| ||X_j||`` of every prunable matrix of the block; the ratio is the fraction of
    those scores above ``m`` times their mean over the whole block (the paper's "layer").
    """
    scores = [
        w.detach().abs().float() * n.to(w.device, torch.float32)
        for w, n in zip(weights, norms, strict=True)
    ]
    count = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / max(count, 1)
    outliers = sum(int((s > m * mean).sum()) for s in scores)
    return outliers / max(count, 1)


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Block sparsities from outlier ratios: OWL's linear spread of width ``2 lam``.

    The block with the most outliers gets the lowest sparsity; the spread is shifted so the
    size-weighted mean (the overall sparsity over all pruned weights) is exactly ``target``.
    Equal ratios give the uniform profile.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min()) if len(ratios) else 0.0
    density = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    sparsity = 1.0 - density
    shift = weighted_sparsity(sparsity.tolist(), sizes) - target
    result = (sparsity - shift).tolist()
    check_block_sparsities(result)
    return result


def check_block_sparsities(sparsities: list[float]) -> None:
    """Raise :class:`PatternError` unless every block sparsity is strictly inside (0, 1)."""
    bad = [(i, s) for i, s in enumerate(sparsities) if not 0.0 < s < 1.0]
    if bad:
        index, value = bad[0]
        raise PatternError(
            f"block {index} would get sparsity {value:.4g}, outside (0, 1); lower the OWL "
            "lambda or the target sparsity, or fix sparsity_per_block"
        )


def block_sizes(blocks: nn.ModuleList, ignore: tuple[str, ...]) -> list[int]:
    """Prunable weights per block."""
    return [
        sum(weight_matrix(layer).numel() for layer in prunable_layers(block, ignore).values())
        for block in blocks
    ]


@torch.no_grad()
def dense_pass(
    model: nn.Module,
    windows: torch.Tensor,
    visit: Callable[[int, dict[str, nn.Module], dict[str, InputStats]], T],
    options: WalkOptions,
    source: BlockSource | None = None,
) -> list[T]:
    """Run the calibration windows ``[n, seq]`` through the dense model block by block and
    return ``visit(index, layers, stats)`` of every block, ``stats`` being its layers' input
    statistics (norms, no Hessian). One block is on ``options.device`` at a time; nothing
    changes. One ``[n, seq, d]`` stream, memory-mapped above ``options.activation_budget``."""
    _, blocks = find_blocks(model)  # dense_pass is also a function of its own (benchmarks)
    source = source or ResidentBlocks(blocks)
    device, batch_size = options.device, options.batch_size
    results = []
    with captured_inputs(model, windows, 1, options) as (hidden, calls, _):
        for index in tqdm(range(len(blocks)), desc="dense pass", disable=not options.progress):
            with block_on_device(source, index, device) as block:
                layers = prunable_layers(block, options.ignore)
                call = calls[index].to(device)
                stats = collect_input_stats(
                    layers,
                    lambda: forward_batches(block, hidden, call, hidden, device, batch_size),  # noqa: B023
                    hessian=False,
                )
                results.append(visit(index, layers, stats))
    return results


def block_sparsities(
    profile: ProfileOptions,
    target: float,
    model: nn.Module,
    windows: torch.Tensor,
    options: WalkOptions,
    source: BlockSource | None = None,
    given_sparsity: float | None = None,
) -> tuple[list[float], list[float] | None]:
    """``(sparsity of every block, OWL outlier ratios or None)`` for ``profile`` around the
    overall ``target`` (``given_sparsity``: the --sparsity the user gave, if any).

    OWL takes a dense pass of the calibration windows ``[n, seq]`` through every block
    (:func:`dense_pass`) for the Wanda scores' outlier ratios.
    """
    _, blocks = find_blocks(model)
    sizes = block_sizes(blocks, options.ignore)
    if profile.per_block is not None:
        return _explicit(profile.per_block, sizes, given_sparsity), None
    if profile.kind != "owl":
        return [target] * len(blocks), None

    def ratio(_index, layers, stats) -> float:
        names = list(layers)
        weights = [weight_matrix(layers[n]) for n in names]
        return outlier_ratio(weights, [stats[n].norms for n in names], profile.owl_m)

    ratios = dense_pass(model, windows, ratio, options, source)
    sparsities = owl_sparsities(ratios, sizes, target, profile.owl_lambda)
    log.info("OWL block sparsities: %s", ", ".join(f"{s:.3f}" for s in sparsities))
    return sparsities, ratios


def _explicit(given: list[float], sizes: list[int], sparsity: float | None) -> list[float]:
    """``sparsity_per_block``, checked against the model's blocks and ``--sparsity``."""
    if len(given) != len(sizes):
        raise ConfigError(
            f"sparsity_per_block has {len(given)} values but the model has {len(sizes)} "
            "decoder blocks"
        )
    overall = weighted_sparsity(given, sizes)
    if sparsity is not None and abs(overall - sparsity) > 1e-6:
        raise ConfigError(
            f"sparsity_per_block gives an overall sparsity of {overall:.6g}, --sparsity "
            f"says {sparsity:g}: drop --sparsity or make them agree"
        )
    return list(given)


def run_profile(model: nn.Module, context: RunContext) -> dict:
    """The profile stage on ``context``: the block sparsities, OWL's ratios, the overall
    sparsity and the profile's name."""
    config, target = context.config, context.pattern.sparsity
    sparsities, ratios = block_sparsities(
        config.profile,
        target,
        model,
        context.windows,
        context.walk,
        context.source,
        config.sparsity,
    )
    explicit = config.profile.per_block is not None
    overall = weighted_sparsity(sparsities, block_sizes(context.blocks, context.walk.ignore))
    return {
        "block_sparsity": sparsities,
        "owl_outlier_ratios": ratios,
        "sparsity": overall if explicit else target,
        "sparsity_profile": "explicit" if explicit else config.profile.kind,
    }
