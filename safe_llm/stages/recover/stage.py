"""The recovery stage (declaration; torch-free): after the block loop, train the whole
pruned model end to end against the dense model, its mask frozen (``--recover``; options
``--recover-<name>``, recipe key ``recover``). The implementation is
:mod:`safe_llm.stages.recover.run` over :mod:`safe_llm.stages.recover.loop`."""

from __future__ import annotations

from safe_llm.stages.base import Stage, register_stage
from safe_llm.stages.recover.options import RecoverOptions


@register_stage
class RecoverStage(Stage):
    """Its result is the recovery report (data, steps, tokens, losses, memory plan),
    recorded as the report's ``recovery``."""

    name = "recover"
    order = 40
    Options = RecoverOptions
    commands = ("prune", "recover")

    @classmethod
    def enabled(cls, config) -> bool:
        return config.recover.enabled

    def run(self, model, context) -> dict:
        from safe_llm.stages.recover.run import run_recovery

        return run_recovery(model, context)

    def record(self, report, result: dict) -> None:
        report.recovery = result
