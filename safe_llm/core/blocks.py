"""Architecture-independent access to a causal LM's decoder blocks and what can be pruned.

Nothing here knows model names. The blocks are the largest ``nn.ModuleList`` of identical
modules that hold linear layers (:func:`find_blocks`); their prunable ``[out, in]`` matrices
are the weights of linear layers and each expert's matrix of a fused expert parameter
(:class:`PrunableMatrix`, :func:`prunable_layers`). :func:`check_prunable` is the one check
that the blocks can take a run's pattern and ``--ignore`` patterns and leave no large weight
dense (:func:`check_coverage`). What a block receives is recorded by
:mod:`safe_llm.core.capture`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from safe_llm.core.experts import expert_layout
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.errors import SafeLLMError
from safe_llm.options import ConfigError

PRUNABLE_TYPES = (nn.Linear, Conv1D)


class BlockDiscoveryError(SafeLLMError):
    """The model has no recognisable stack of decoder blocks."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, module_list)`` of the model's decoder blocks.

    Chooses, among ``nn.ModuleList`` s whose children are all of one class and contain linear
    layers, the one holding the most parameters.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if isinstance(module[0], PRUNABLE_TYPES) or not any(
            isinstance(m, PRUNABLE_TYPES) for m in module[0].modules()
        ):
            continue  # a block holds linear layers; a list of bare linears is not a stack
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise BlockDiscoveryError(
            f"{type(model).__name__} has no decoder blocks: found no nn.ModuleList of "
            "identical modules containing linear layers; safe-llm prunes decoder-only "
            "transformers whose blocks are stored in an nn.ModuleList"
        )
    return best[1], best[2]


@dataclass(frozen=True, eq=False)
class PrunableMatrix:
    """One ``[out, in]`` matrix the engine prunes: the weight of an ``nn.Linear`` / ``Conv1D``,
    or one expert's matrix in a fused 3-D expert parameter (``gate_up_proj [E, out, in]``, or
    ``[E, in, out]`` where the experts module declares ``is_transposed``).

    ``param_name`` is the parameter's name relative to the block (``self_attn.q_proj.weight``,
    ``mlp.experts.gate_up_proj``); ``expert`` its index along the expert dimension (None for a
    linear layer); ``transposed``: the stored layout is ``[in, out]``.
    """

    module: nn.Module
    attr: str
    param_name: str
    expert: int | None = None
    transposed: bool = False

    @property
    def param(self) -> nn.Parameter:
        """The whole parameter the matrix lives in (3-D for fused experts)."""
        return getattr(self.module, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        """The matrix in its stored layout: the parameter, or the expert's slice of it."""
        param = self.param
        return param if self.expert is None else param[self.expert]

    def matrix(self, stored: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[out, in]`` view of :attr:`weight` (or of a tensor laid out like it, or like
        the whole parameter): writing into it writes the stored tensor."""
        value = self.weight if stored is None else stored
        if self.expert is not None and value.dim() == self.param.dim():
            value = value[self.expert]
        return value.t() if self.transposed else value


def _module_matrices(name: str, module: nn.Module) -> Iterator[tuple[str, PrunableMatrix]]:
    """The prunable matrices a module holds itself (not its children's)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, PRUNABLE_TYPES):
        handle = PrunableMatrix(
            module, "weight", f"{prefix}weight", None, isinstance(module, Conv1D)
        )
        yield name, handle
        return
    transposed = expert_layout(module)
    if transposed is None:
        return
    for attr, param in module.named_parameters(recurse=False):
        if param.dim() != 3 or not param.is_floating_point():
            continue  # biases [E, out] and anything else stay as they are
        for expert in range(param.shape[0]):
            handle = PrunableMatrix(module, attr, f"{prefix}{attr}", expert, transposed)
            yield f"{prefix}{attr}[{expert}]", handle


def _ignored(name: str, param_name: str, ignore: tuple[str, ...]) -> bool:
    """Whether an fnmatch pattern of ``ignore`` names the matrix (``mlp.down_proj``,
    ``mlp.experts.gate_up_proj[3]``, which is also matched literally) or its parameter
    (``mlp.experts.down_proj``: every expert's)."""
    owner = param_name.removesuffix(".weight")
    return any(
        name == pattern or fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(owner, pattern)
        for pattern in ignore
    )


def prunable_layers(block: nn.Module, ignore: tuple[str, ...] = ()) -> dict[str, PrunableMatrix]:
    """The block's prunable matrices by name relative to the block, minus ``ignore`` patterns.

    A linear layer is named like its module (``mlp.down_proj``); an expert's matrix of a
    fused parameter by the parameter and the index (``mlp.experts.gate_up_proj[3]``). The
    routers of mixture-of-experts layers are not among them (:func:`_routers`).
    ``ignore`` holds fnmatch patterns matched against these names and the parameters' names.
    """
    routers = _routers(block)
    return {
        name: handle
        for module_name, module in block.named_modules()
        if id(module) not in routers
        for name, handle in _module_matrices(module_name, module)
        if not _ignored(name, handle.param_name, ignore)
    }


def unmatched_patterns(blocks: nn.ModuleList, ignore: tuple[str, ...]) -> list[str]:
    """The ``ignore`` patterns that name no prunable matrix and no parameter of any block (a
    pattern that matches nothing leaves the run pruning what the user meant to keep)."""
    names: set[str] = set()
    for block in blocks:
        for name, handle in prunable_layers(block).items():
            names |= {name, handle.param_name, handle.param_name.removesuffix(".weight")}
        for name, _ in block.named_parameters():
            names |= {name, name.removesuffix(".weight")}
    return [p for p in ignore if not any(n == p or fnmatch.fnmatch(n, p) for n in names)]


def _routers(block: nn.Module) -> set[int]:
    """Ids of the linear layers beside a declared experts module (children of the same parent)
    with at most as many outputs as it has experts: its router and gates (Qwen3-Next's
    ``shared_expert_gate``, routers stored as ``nn.Linear``), which stay dense."""
    routers = set()
    for parent in block.modules():
        counts = [
            p.shape[0]
            for child in parent.children()
            if expert_layout(child) is not None
            for p in child.parameters(recurse=False)
            if p.dim() == 3
        ]
        if not counts:
            continue
        for child in parent.children():
            if isinstance(child, PRUNABLE_TYPES) and weight_matrix(child).shape[0] <= max(counts):
                routers.add(id(child))
    return routers


def as_matrix_handle(name: str, layer: nn.Module | PrunableMatrix) -> PrunableMatrix:
    """``layer`` itself if it is a handle, else the handle of a linear layer's weight."""
    if isinstance(layer, PrunableMatrix):
        return layer
    return PrunableMatrix(layer, "weight", f"{name}.weight", None, isinstance(layer, Conv1D))


def weight_matrix(layer: nn.Module | PrunableMatrix) -> torch.Tensor:
    """The weight as an ``[out, in]`` view (GPT-2's Conv1D stores ``[in, out]``)."""
    if isinstance(layer, PrunableMatrix):
        return layer.matrix()
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


UNPRUNED_LIMIT = 0.05  # of a block's parameters: a dense weight above it stops the run


class CoverageError(SafeLLMError):
    """A block holds a large weight the engine would leave dense."""


def unpruned_weights(block: nn.Module, ignore: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """The block's floating parameters of 2+ dimensions that no prunable matrix covers (routers,
    convolutions, anything the engine cannot read as ``[out, in]`` matrices), by name relative
    to the block; those named by ``ignore`` (fnmatch, the parameter or its module) are left out.
    """
    covered = {id(h.param) for h in prunable_layers(block).values()} | _expert_vectors(block)
    return {
        name: param
        for name, param in block.named_parameters()
        if param.dim() >= 2
        and param.is_floating_point()
        and id(param) not in covered
        and not _ignored(name, name, ignore)
    }


def _expert_vectors(block: nn.Module) -> set[int]:
    """Ids of the per-expert vectors of the block's declared experts modules (biases
    ``[E, out]``): biases, not weights, though stored in two dimensions."""
    return {
        id(param)
        for module in block.modules()
        if expert_layout(module) is not None
        for param in module.parameters(recurse=False)
        if param.dim() == 2
    }


def check_coverage(blocks: nn.ModuleList, ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`CoverageError` naming every block weight the engine would leave dense that
    holds more than :data:`UNPRUNED_LIMIT` of its block's parameters (not named by ``ignore``):
    a run must not report a sparsity that leaves most of a block dense."""
    found: dict[str, float] = {}
    for block in blocks:
        size = sum(p.numel() for p in block.parameters())
        for name, param in unpruned_weights(block, ignore).items():
            if param.numel() > UNPRUNED_LIMIT * size:
                found[name] = max(found.get(name, 0.0), param.numel() / size)
    if found:
        listed = ", ".join(f"{name} ({share:.0%} of its block)" for name, share in found.items())
        raise CoverageError(
            f"the blocks hold weights safe-llm cannot prune (it reads nn.Linear, Conv1D and "
            f"fused experts declared by transformers' use_experts_implementation): {listed}. "
            "They would stay dense while the report counts only what was pruned; pass them "
            "to --ignore (e.g. --ignore " + " --ignore ".join(found) + ") to prune the rest"
        )


def check_prunable(
    blocks: nn.ModuleList, pattern: SparsityPattern, ignore: tuple[str, ...] = ()
) -> None:
    """The one check that ``blocks`` can be pruned to ``pattern``, for a run before any
    calibration work (and for :func:`~safe_llm.stages.prune.engine.prune_model` called on its
    own): every ``ignore`` pattern names a weight of some block and leaves something to prune
    (:class:`~safe_llm.options.ConfigError`), every matrix not ignored can take ``pattern``
    (:class:`~safe_llm.core.sparsity.PatternError`), no large block weight would stay dense
    (:class:`CoverageError`)."""
    unmatched = unmatched_patterns(blocks, ignore)
    if unmatched:
        names = ", ".join(prunable_layers(blocks[0]))
        raise ConfigError(
            f"--ignore {' '.join(unmatched)} matches no weight of any block; patterns are "
            f"relative to a block, e.g. one of: {names}"
        )
    layers = [prunable_layers(block, ignore) for block in blocks]
    if not any(layers):
        raise ConfigError("--ignore excludes every layer of every block; nothing would be pruned")
    for index, block_layers in enumerate(layers):
        for name, layer in block_layers.items():
            pattern.check_shape(tuple(weight_matrix(layer).shape), f"block {index} {name}")
    check_coverage(blocks, ignore)


def dense_block_weights(
    blocks: nn.ModuleList, ignore: tuple[str, ...] = ()
) -> tuple[int, int, dict[str, int]]:
    """``(zeros, total, {name: parameters})`` of the block weights of 2+ dimensions that are not
    pruned (ignored layers included; experts' biases ``[E, out]`` are biases, not counted),
    summed over the blocks; the zeros of blocks not in memory (streamed, on meta) count as
    none."""
    zeros = total = 0
    names: dict[str, int] = {}
    for block in blocks:
        kept = {id(h.param) for h in prunable_layers(block, ignore).values()}
        kept |= _expert_vectors(block)
        for name, param in block.named_parameters():
            if param.dim() < 2 or not param.is_floating_point() or id(param) in kept:
                continue
            names[name] = names.get(name, 0) + param.numel()
            total += param.numel()
            zeros += 0 if param.is_meta else int((param == 0).sum())
    return zeros, total, names
