"""The typed reports of a block walk: each pruned block's :class:`BlockReport` and the prune
stage's :class:`PruneReport`, recorded by the run report without knowing the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class BlockReport:
    """One pruned block: its time, the relative error of its outputs against its targets,
    each prunable matrix's achieved sparsity and (with layer errors on) relative output error,
    and what the method reported (``extra``)."""

    index: int
    seconds: float
    reconstruction_error: float
    layer_sparsity: dict[str, float]
    layer_error: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class PruneReport:
    """The prune stage's walk over the blocks (times in seconds, memory in bytes)."""

    blocks: list[BlockReport]
    seconds: float
    peak_memory_bytes: int
    overall_sparsity: float
    resumed_from_block: int = 0
    # zeros over every weight of 2+ dimensions in the blocks, pruned or not
    all_block_weights_sparsity: float = float("nan")
    # block weights of 2+ dimensions left dense (routers, convolutions, --ignore): parameters
    # summed over the blocks, by name relative to the block
    unpruned_block_weights: dict[str, int] = field(default_factory=dict)
    # whether the blocks report each layer's error (``layer_error``; --layer-errors)
    layer_errors: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict) -> PruneReport:
        """The report of its :meth:`to_dict` document (a work area's saved stage result)."""
        blocks = [BlockReport(**b) for b in document["blocks"]]
        return cls(**{**document, "blocks": blocks})
