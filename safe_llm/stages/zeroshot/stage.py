"""The zero-shot stages (declaration; torch-free): with ``--eval-tasks``, the dense model's
accuracy on lm-evaluation-harness tasks first, the pruned (and recovered) model's last, with
:func:`safe_llm.evaluation.zeroshot.evaluate_tasks`; recorded in the report's ``zeroshot``
``{"dense": ..., "pruned": ...}``."""

from __future__ import annotations

from safe_llm.options import parse_list
from safe_llm.stages.base import Stage, register_stage
from safe_llm.stages.zeroshot.options import ZeroShotOptions


def evaluate_model_tasks(model, context) -> dict:
    """Zero-shot accuracy of ``model`` on ``--eval-tasks``, on the run's device and back."""
    from safe_llm.evaluation.zeroshot import evaluate_tasks

    options, config = context.config.zeroshot, context.config
    home = next(model.parameters()).device
    model.to(context.device)
    try:
        return evaluate_tasks(
            model,
            context.tokenizer,
            parse_list(options.tasks),
            batch_size=config.batch_size,
            limit=options.limit,
            task_data=options.task_data,
            seed=config.seed,
        )
    finally:
        model.to(home)


class _ZeroShot(Stage):
    key = ""

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.zeroshot.tasks)

    def run(self, model, context) -> dict:
        return evaluate_model_tasks(model, context)

    def record(self, report, result: dict) -> None:
        report.zeroshot[self.key] = result


@register_stage
class DenseZeroShot(_ZeroShot):
    name = "dense_zeroshot"
    order = 11
    key = "dense"


@register_stage
class ZeroShot(_ZeroShot):
    name = "zeroshot"
    order = 91
    key = "pruned"
    commands = ("prune", "recover")
    Options = ZeroShotOptions
