"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

An optional extra: ``pip install 'safe-llm[eval]'``. The standard set of the pruning papers
(SparseGPT, Wanda, SAFE) is :data:`STANDARD_TASKS`; their headline figure is the mean accuracy
over those seven tasks. The mean here is over the requested tasks with ``metric`` (``acc`` by
default, as Wanda reports; tasks without the metric, e.g. ``acc_norm`` on BoolQ, use ``acc``).

The harness downloads each task's dataset from the Hugging Face Hub on first use (then reads the
``datasets`` cache). Local tasks -- a directory of task YAMLs -- are passed as ``include_path``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from torch import nn

from safe_llm.errors import SafeLLMError
from safe_llm.options import parse_list

log = logging.getLogger(__name__)

STANDARD_TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
METRICS = ("acc", "acc_norm")
INSTALL_HINT = "pip install 'safe-llm[eval]'"


class ZeroShotError(SafeLLMError):
    """Zero-shot evaluation cannot run: lm-eval missing, unknown task, dataset unavailable."""


def require_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as exc:
        raise ZeroShotError(
            f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from exc
    return lm_eval


def task_manager(include_path: str | os.PathLike | None = None, defaults: bool = True):
    """An lm-eval ``TaskManager`` with the tasks under ``include_path`` and, with ``defaults``,
    the harness's built-in tasks (indexing those takes seconds)."""
    lm_eval = require_lm_eval()
    if include_path is not None and not os.path.isdir(include_path):
        raise ZeroShotError(f"task directory {include_path} does not exist")
    return lm_eval.tasks.TaskManager(
        include_path=str(include_path) if include_path else None, include_defaults=defaults
    )


def _manager_for(tasks: list[str], include_path) -> object:
    """A manager that knows every one of ``tasks``: the local one alone when it suffices."""
    if not tasks:
        raise ZeroShotError("no tasks given; e.g. --tasks " + ",".join(STANDARD_TASKS))
    if include_path is not None:
        local = task_manager(include_path, defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = task_manager(include_path)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise ZeroShotError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; the standard set is "
            f"{','.join(STANDARD_TASKS)} (a directory of task YAMLs goes to --include-path)"
        )
    return manager


def _task_result(name: str, metrics: dict, samples: dict, metric: str) -> dict:
    """One task's entry: every accuracy metric lm-eval reported, and the one used for the mean."""
    values = {m: float(metrics[f"{m},none"]) for m in METRICS if f"{m},none" in metrics}
    if not values:
        raise ZeroShotError(f"task {name} reports no accuracy metric (acc / acc_norm)")
    used = metric if metric in values else "acc"
    result = {**values, "metric": used, "value": values.get(used, next(iter(values.values())))}
    if name in samples:
        result["samples"] = int(samples[name]["effective"])
    return result


def _run_harness(lm_eval, lm, tasks, manager, num_fewshot, limit, seed):
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (OSError, ConnectionError) as exc:  # datasets / hub errors (offline, missing files)
        raise ZeroShotError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({type(exc).__name__}: "
            f"{exc}); the first run downloads each task's dataset from the Hugging Face Hub"
        ) from exc


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | Iterable[str] = STANDARD_TASKS,
    *,
    batch_size: int = 1,
    num_fewshot: int = 0,
    limit: int | None = None,
    include_path: str | os.PathLike | None = None,
    metric: str = "acc",
    seed: int = 0,
) -> dict:
    """Accuracy of the in-memory ``model`` on lm-eval ``tasks`` (comma-separated or a list).

    The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` and evaluated on the
    device it is on. Returns ``{"harness", "num_fewshot", "limit", "metric", "tasks": {name:
    {"acc", "acc_norm"?, "metric", "value", "samples"}}, "mean", "protocol"}``; ``limit`` (at
    most this many examples per task) makes the numbers incomparable with published ones.
    """
    if metric not in METRICS:
        raise ZeroShotError(f"unknown metric {metric!r}; choose {' or '.join(METRICS)}")
    lm_eval = require_lm_eval()
    names = parse_list(tasks)
    manager = _manager_for(names, include_path)
    lm = lm_eval.models.huggingface.HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size
    )
    output = _run_harness(lm_eval, lm, names, manager, num_fewshot, limit, seed)
    samples = output.get("n-samples", {})
    results = {n: _task_result(n, output["results"][n], samples, metric) for n in names}
    mean = sum(r["value"] for r in results.values()) / len(results)
    return {
        "harness": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}",
        "num_fewshot": num_fewshot,
        "limit": limit,
        "metric": metric,
        "tasks": results,
        "mean": mean,
        "protocol": protocol_label(names, num_fewshot, metric, limit),
    }


def protocol_label(tasks: list[str], num_fewshot: int, metric: str, limit: int | None) -> str:
    """How the zero-shot mean was computed, e.g. for the 7-task mean of the papers."""
    shots = "zero-shot" if num_fewshot == 0 else f"{num_fewshot}-shot"
    standard = sorted(tasks) == sorted(STANDARD_TASKS)
    what = "the standard 7-task mean" if standard else f"mean over {len(tasks)} task(s)"
    label = f"{shots} accuracy ({metric}, lm-evaluation-harness), {what}"
    if limit is not None:
        label += f", at most {limit} examples per task: not comparable with published numbers"
    return label


def format_tasks(result: dict) -> list[str]:
    """Terminal lines: one per task, then the mean with its protocol."""
    lines = [
        f"{name}: {r['metric']} {r['value']:.4f}"
        + (f" ({r['samples']} examples)" if "samples" in r else "")
        for name, r in result["tasks"].items()
    ]
    lines.append(f"mean: {result['mean']:.4f} ({result['protocol']})")
    return lines
