"""The prune stage (declaration; torch-free): the method prunes every decoder block in turn,
with joint windows (its options, recipe key ``joint``, flags ``--joint-<name>``). The
implementation is :mod:`safe_llm.stages.prune.loop` over the engine."""

from __future__ import annotations

from safe_llm.stages.base import Stage, register_stage
from safe_llm.stages.prune.options import JointOptions


@register_stage
class PruneStage(Stage):
    """The block loop; its result is the engine's report (blocks, time, memory, sparsity)."""

    name = "prune"
    order = 30
    Options = JointOptions
    section = "joint"

    def run(self, model, context) -> dict:
        from safe_llm.stages.prune.loop import run_block_loop

        return run_block_loop(model, context)

    def record(self, report, result: dict) -> None:
        report.add_engine(result)

    def restore(self, model, context, result: dict) -> None:
        from safe_llm.stages.prune.loop import restore_pruned_blocks

        restore_pruned_blocks(model, context)
