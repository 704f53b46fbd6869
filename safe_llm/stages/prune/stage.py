"""The prune stage (declaration; torch-free): the method prunes every decoder block in turn,
with joint windows (its options, recipe key ``joint``, flags ``--joint-<name>``). The
implementation is :mod:`safe_llm.stages.prune.loop` over the engine."""

from __future__ import annotations

from safe_llm.core.reports import PruneReport
from safe_llm.stages.base import Stage, register_stage
from safe_llm.stages.prune.options import PruneOptions


@register_stage
class PruneStage(Stage):
    """The block loop; its result is the engine's typed :class:`PruneReport` (blocks, time,
    memory, sparsity)."""

    name = "prune"
    order = 30
    Options = PruneOptions
    section = "joint"

    def run(self, model, context) -> PruneReport:
        from safe_llm.stages.prune.loop import run_block_loop

        return run_block_loop(model, context)

    def record(self, report, result: PruneReport) -> None:
        report.add_prune(result)

    def document(self, result: PruneReport) -> dict:
        return result.to_dict()

    def from_document(self, document: dict) -> PruneReport:
        return PruneReport.from_dict(document)

    def restore(self, model, context, result: PruneReport) -> None:
        from safe_llm.stages.prune.loop import restore_pruned_blocks

        restore_pruned_blocks(model, context)
