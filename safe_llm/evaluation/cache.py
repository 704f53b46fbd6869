"""A disk cache of perplexities, keyed on everything that decides the number.

The dense perplexity of a model on a text is the same every time: the demo, the benchmark and
every ``safe-llm prune --eval`` of the same model would recompute it. The key is a hash of the
model's weights (every tensor's name, dtype, shape and bytes), the evaluation windows' token
ids, the batch size, the device type and dtype, and the torch version, so a hit is exactly the
number a fresh computation gives on that machine's software. Entries are small JSON files in
``$SAFE_LLM_CACHE/perplexity`` (see :func:`safe_llm.io.models.cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from safe_llm.core.atomic import atomic_write
from safe_llm.io.models import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1


def _update(digest, tensor: torch.Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().data)


def weights_fingerprint(model: nn.Module) -> str | None:
    """A hash of every tensor of ``model`` (None if some are not in memory, e.g. meta)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            return None
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()


def perplexity_key(model: nn.Module, windows: torch.Tensor, batch_size: int) -> str | None:
    """The cache key of ``model``'s perplexity on ``windows`` ``[w, seqlen]``, or None."""
    weights = weights_fingerprint(model)
    if weights is None:
        return None
    param = next(model.parameters())
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{FORMAT}|{weights}|{batch_size}|{param.device.type}|{param.dtype}".encode())
    digest.update(torch.__version__.encode())
    _update(digest, windows.to(torch.int64))
    return digest.hexdigest()


def cached_perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int, compute: Callable[[], float]
) -> tuple[float, bool]:
    """``(perplexity, from_cache)``: the cached value for this exact model, windows and
    settings, else ``compute()`` (stored for next time)."""
    key = perplexity_key(model, windows, batch_size)
    path = cache_dir() / "perplexity" / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            return float(json.loads(path.read_text())["perplexity"]), True
        except (OSError, ValueError, KeyError):
            log.warning("ignoring an unreadable perplexity cache entry %s", path)
    value = compute()
    if path is not None:
        _store(path, value)
    return value, False


def _store(path: Path, value: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"perplexity": value})))
    except OSError as error:  # a read-only cache must not fail the evaluation
        log.warning("could not write the perplexity cache %s: %s", path, error)
