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
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from safe_llm import __version__, data
from safe_llm.errors import SafeLLMError
from safe_llm.memory import return_freed_memory
from safe_llm.perplexity import check_seqlen, perplexity
from safe_llm.result_cache import cached_perplexity

FORMULA = "exp(mean over windows of the window's mean next-token NLL)"


class EvalError(SafeLLMError):
    """Unusable evaluation options (nothing to evaluate, a size below its minimum)."""


def parse_list(values: str | Iterable[str] | None) -> list[str]:
    """``"a,b"`` / ``["a", "b,c"]`` -> ``["a", "b", "c"]``: comma- and space-separated lists.

    Empty items are dropped and duplicates kept once, in first-seen order.
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    items = (item.strip() for value in values for item in value.replace(",", " ").split())
    return list(dict.fromkeys(item for item in items if item))


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
    :mod:`safe_llm.result_cache`, exact for these weights and windows; ``cache=False`` always
    computes), ``nll`` (mean token NLL, nats), ``seqlen``, ``windows`` (evaluated),
    ``total_windows`` (the source has), ``tokens`` (``windows * seqlen``), ``protocol`` (a
    label, see :func:`protocol_label`) and ``seconds``. Raises
    :class:`~safe_llm.perplexity.SeqlenError` before loading any text if ``seqlen`` exceeds the
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
    """:func:`safe_llm.data.evaluation_windows`, tokenized once per process (the dense and the
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, document: dict) -> Path:
    """Write ``document`` to ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        with os.fdopen(fd, "w") as fh:
            json.dump(document, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
