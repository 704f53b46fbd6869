"""The evaluation harness: token perplexity over text sources, zero-shot tasks, JSON results.

Every perplexity carries a ``protocol`` label saying how the number was computed, because
numbers from different protocols are not comparable (lm-evaluation-harness's ``wikitext`` task,
for example, reports *word* perplexity on document-level text):

* ``wikitext2``: ``wikitext`` / ``wikitext-2-raw-v1`` test split joined with ``"\\n\\n"``,
  tokenized once, cut into ``numel // seqlen`` non-overlapping windows (SparseGPT/Wanda);
* ``c4``: ``allenai/c4`` ``en/c4-validation.00000-of-00008.json.gz``, the first 1100 documents
  joined with ``" "``, the first ``256 * seqlen`` tokens (SparseGPT/Wanda);
* anything else (built-in texts, local files, other datasets): its documents joined with
  ``"\\n\\n"``, non-overlapping windows, the same perplexity formula.

Perplexity is ``exp`` of the mean over windows of each window's mean next-token NLL.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from safe_llm.core.atomic import atomic_write
from safe_llm.core.memory import large_buffers_from_mmap, return_freed_memory
from safe_llm.errors import SafeLLMError
from safe_llm.evaluation.cache import cached_perplexity
from safe_llm.evaluation.perplexity import check_seqlen, perplexity, refuse_long_windows
from safe_llm.evaluation.task_data import task_data_root
from safe_llm.evaluation.zeroshot import evaluate_tasks, require_lm_eval
from safe_llm.io import data
from safe_llm.options import parse_list
from safe_llm.version import __version__

FORMULA = "exp(mean over windows of the window's mean next-token NLL)"


class EvalError(SafeLLMError):
    """Unusable evaluation options (nothing to evaluate, a size below its minimum)."""


def protocol_label(source: str, seqlen: int, windows: int, total_windows: int) -> str:
    """A human-readable description of how the perplexity of ``source`` was computed."""
    if source == "wikitext2":
        where = "SparseGPT/Wanda protocol: wikitext-2-raw-v1 test split joined with '\\n\\n'"
    elif source == "c4":
        where = (
            "SparseGPT/Wanda protocol: allenai/c4 en validation shard 0, first "
            f"{data.C4_EVAL_DOCUMENTS} documents joined with ' '"
        )
    else:
        where = f"SparseGPT/Wanda windowing of {source}: documents joined with '\\n\\n'"
    label = f"token perplexity, {where}, seqlen {seqlen}, {windows} non-overlapping windows"
    if windows < total_windows:
        label += f" (first {windows} of {total_windows}: not comparable with full-split numbers)"
    return label


def source_perplexity(
    model: nn.Module,
    tokenizer,
    source: str,
    seqlen: int,
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
    text_column: str = "text",
    progress: bool = False,
    cache: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``source`` with ``seqlen``-token windows, as a result dict.

    Keys: ``perplexity``, ``cached`` (taken from the disk cache of
    :mod:`safe_llm.evaluation.cache`, exact for these weights and windows; ``cache=False`` always
    computes), ``nll`` (mean token NLL, nats), ``seqlen``, ``windows`` (evaluated),
    ``total_windows`` (the source has), ``tokens`` (``windows * seqlen``), ``protocol`` (a
    label, see :func:`protocol_label`) and ``seconds``. Raises
    :class:`~safe_llm.evaluation.perplexity.SeqlenError` before loading any text if ``seqlen`` exceeds the
    model's maximum length.
    """
    check_seqlen(model, seqlen)
    start = time.perf_counter()
    windows = _source_windows(tokenizer, source, seqlen, text_column)
    total = int(windows.shape[0])
    windows = windows[:max_windows] if max_windows is not None else windows  # [w, seqlen]
    ppl, cached = (
        cached_perplexity(
            model,
            windows,
            batch_size,
            lambda: perplexity(model, windows, batch_size, device, progress),
        )
        if cache
        else (perplexity(model, windows, batch_size, device, progress), False)
    )
    count = int(windows.shape[0])
    return {
        "perplexity": ppl,
        "cached": cached,
        "nll": math.log(ppl),
        "seqlen": seqlen,
        "windows": count,
        "total_windows": total,
        "tokens": count * seqlen,
        "protocol": protocol_label(source, seqlen, count, total),
        "seconds": time.perf_counter() - start,
    }


_WINDOWS: dict[tuple, torch.Tensor] = {}


def _source_windows(tokenizer, source: str, seqlen: int, text_column: str) -> torch.Tensor:
    """:func:`safe_llm.io.data.evaluation_windows`, tokenized once per process (the dense and the
    pruned evaluation of a run share them); the tokenizer's freed buffers (about 0.3 GB for a
    2 MB text) go back to the operating system."""
    path = Path(source).expanduser()
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    key = (
        id(tokenizer),
        getattr(tokenizer, "name_or_path", ""),
        source,
        stamp,
        seqlen,
        text_column,
    )
    if key not in _WINDOWS:
        if len(_WINDOWS) >= 8:  # a few MB each: keep the last eight
            del _WINDOWS[next(iter(_WINDOWS))]
        _WINDOWS[key] = data.evaluation_windows(tokenizer, source, seqlen, text_column=text_column)
        return_freed_memory()
    return _WINDOWS[key]


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    sources: str | Iterable[str],
    seqlen: int,
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
    text_column: str = "text",
    progress: bool = False,
    cache: bool = True,
) -> dict[str, dict]:
    """``{source: result}`` for each of ``sources`` (see :func:`source_perplexity`).

    ``sources`` may be comma-separated. The model must already be on ``device``; the
    maximum-length check runs once, before any text is loaded.
    """
    names = parse_list(sources)
    if names:
        check_seqlen(model, seqlen)
    return {
        source: source_perplexity(
            model,
            tokenizer,
            source,
            seqlen,
            batch_size=batch_size,
            device=device,
            max_windows=max_windows,
            text_column=text_column,
            progress=progress,
            cache=cache,
        )
        for source in names
    }


def check_request(
    datasets: str | Iterable[str] | None,
    tasks: str | Iterable[str] | None,
    sizes: dict[str, int | None],
    num_fewshot: int = 0,
    task_data: str | None = None,
) -> tuple[list[str], list[str]]:
    """``(perplexity sources, tasks)`` of an evaluation; raise :class:`EvalError` (or
    :class:`~safe_llm.evaluation.task_data.TaskDataError`) before anything is loaded if
    unusable. ``datasets=None`` means ``wikitext2`` unless tasks are given; ``sizes`` maps
    ``seqlen``, ``batch_size``, ``max_windows`` and ``limit`` to values."""
    task_names = parse_list(tasks)
    sources = parse_list(datasets) if datasets is not None else []
    if datasets is None and not task_names:
        sources = ["wikitext2"]
    if not sources and not task_names:
        raise EvalError("nothing to evaluate: give --datasets and/or --tasks")
    for name, minimum in (("seqlen", 2), ("batch_size", 1), ("max_windows", 1), ("limit", 1)):
        value = sizes.get(name)
        if value is not None and value < minimum:
            raise EvalError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    if num_fewshot < 0:
        raise EvalError(f"--num-fewshot must be at least 0, got {num_fewshot}")
    if task_names:
        require_lm_eval()  # a missing extra fails before the model is loaded
        task_data_root(task_data)  # so does a --task-data that is not there
    return sources, task_names


@large_buffers_from_mmap()
def evaluate(
    model: str,
    datasets: str | Iterable[str] | None = None,
    tasks: str | Iterable[str] | None = None,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    text_column: str = "text",
    trust_remote_code: bool = False,
    num_fewshot: int = 0,
    limit: int | None = None,
    include_path: str | None = None,
    task_data: str | None = None,
    metric: str = "acc",
    progress: bool = False,
    cache: bool = True,
) -> dict:
    """What ``safe-llm eval`` runs: token perplexity of ``model`` (directory, hub id, .gguf or
    built-in) on each of ``datasets`` and zero-shot accuracy on ``tasks`` (lm-evaluation-
    harness; task data from ``task_data``, see :mod:`safe_llm.evaluation.task_data`). Returns
    the results document (the JSON ``safe-llm eval --json`` writes), with
    ``perplexity`` ``{source: result}`` and, with tasks, ``zeroshot``. ``cache=False``
    recomputes perplexities found in the disk cache."""
    from safe_llm.io.models import context_length, load_model, resolve_device, resolve_dtype

    sizes = {"seqlen": seqlen, "batch_size": batch_size, "max_windows": max_windows}
    sizes["limit"] = limit
    sources, task_names = check_request(datasets, tasks, sizes, num_fewshot, task_data)
    if sources:  # before any weight is loaded
        refuse_long_windows(seqlen, context_length(model, trust_remote_code))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    loaded, tokenizer, _ = load_model(model, dtype, trust_remote_code)
    loaded.to(device)
    windows = {"max_windows": max_windows, "text_column": text_column, "progress": progress}
    windows["cache"] = cache
    perplexities = evaluate_perplexity(
        loaded, tokenizer, sources, seqlen, batch_size=batch_size, device=device, **windows
    )
    zeroshot = None
    if task_names:
        shots = {"num_fewshot": num_fewshot, "limit": limit, "include_path": include_path}
        shots["task_data"] = task_data
        zeroshot = evaluate_tasks(
            loaded, tokenizer, task_names, batch_size=batch_size, metric=metric, **shots
        )
    return results_document(model, device, dtype, perplexities, zeroshot)


def format_perplexity(source: str, result: dict) -> str:
    """One line for the terminal: the number and its protocol."""
    cached = ", from the cache" if result.get("cached") else ""
    return f"{source}: perplexity {result['perplexity']:.4f} ({result['protocol']}{cached})"


def results_document(model: str, device, dtype, perplexities: dict, zeroshot=None) -> dict:
    """The JSON document ``safe-llm eval --json`` writes."""
    document = {
        "tool": f"safe-llm {__version__}",
        "model": model,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "perplexity_formula": FORMULA,
        "perplexity": perplexities,
    }
    if zeroshot is not None:
        document["zeroshot"] = zeroshot
    document["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return document


def write_json(path: str | os.PathLike, document: dict) -> Path:
    """Write ``document`` to ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
