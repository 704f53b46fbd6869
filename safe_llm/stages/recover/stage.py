"""The recovery stage (declaration; torch-free): after the block loop, train the whole
pruned model end to end against the dense model, its mask frozen (``--recover``; options
``--recover-<name>``, recipe key ``recover``). The implementation is
:mod:`safe_llm.stages.recover.run` over :mod:`safe_llm.stages.recover.loop`."""

from __future__ import annotations

import os

from safe_llm.options import ConfigError
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

    @classmethod
    def check(cls, config) -> None:
        options = config.recover
        if not options.enabled:
            return
        if config.stream_from_disk:
            raise ConfigError(
                "--recover trains the whole model and cannot run with --stream-from-disk; "
                "prune first, then run safe-llm recover on the checkpoint"
            )
        if not options.lr > 0:  # lr 0 runs every step and moves no weight
            raise ConfigError(
                f"--recover-lr must be positive, got {options.lr:g}: a step of 0 cannot move a "
                "weight (the default is 2.5e-3)"
            )
        if options.dataset:
            from safe_llm.io.data import check_source

            check_source(options.dataset)
        if options.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            from safe_llm.stages.recover.fsdp import NEEDS_RANKS

            raise ConfigError(NEEDS_RANKS)  # checked before any pruning; recover() checks again

    def run(self, model, context) -> dict:
        from safe_llm.stages.recover.run import run_recovery

        return run_recovery(model, context)

    def record(self, report, result: dict) -> None:
        report.recovery = result
