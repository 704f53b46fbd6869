"""Token perplexity with the SparseGPT/Wanda protocol."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from safe_llm.errors import SafeLLMError
from safe_llm.io.models import config_max_length

log = logging.getLogger(__name__)


class SeqlenError(SafeLLMError):
    """Windows longer than the model's maximum length (they would be silently truncated)."""


def model_max_length(model) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``) of the model's config, if it has one."""
    config = getattr(model, "config", None)
    return config_max_length(config) if config is not None else None


def check_seqlen(model, seqlen: int) -> None:
    """Raise :class:`SeqlenError` if ``seqlen`` exceeds the model's maximum length."""
    refuse_long_windows(seqlen, model_max_length(model))


def refuse_long_windows(seqlen: int | None, max_length: int | None, flag: str = "--seqlen"):
    """Raise :class:`SeqlenError` if windows of ``seqlen`` tokens (given as ``flag``) exceed
    the model's ``max_length`` positions."""
    if max_length is not None and seqlen is not None and seqlen > max_length:
        raise SeqlenError(
            f"{flag} {seqlen} exceeds the model's maximum length {max_length} "
            f"(max_position_embeddings in its config); use {flag} {max_length} or less"
        )


# logits held at once by the chunked cross-entropy: 2**24 floats (64 MiB in fp32)
LOGIT_CHUNK_ELEMENTS = 2**24


def window_nlls(
    model, batch: torch.LongTensor, split: tuple[nn.Module, nn.Module] | None = None
) -> torch.Tensor:
    """Mean next-token NLL of each window, float32 ``[batch]``, for ``batch`` ``[batch, seqlen]``.

    With ``split`` (``(body, head)`` from :func:`head_split`) the model's body runs once and
    its output head over chunks of tokens, so the ``[batch, seqlen, vocab]`` logits (and the
    softmax's copy of them) are never held whole: 8 windows of 512 tokens of a 49k vocabulary
    are 0.8 GB. Without it, the model's full logits are used.
    """
    targets = batch[:, 1:]
    if split is None:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="none")
        return nll.view(targets.shape).mean(dim=1)
    body, head = split
    hidden = body(input_ids=batch, use_cache=False).last_hidden_state[:, :-1, :].flatten(0, 1)
    flat_targets = targets.reshape(-1)
    step = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    nll = [
        F.cross_entropy(
            head(hidden[i : i + step]).float(), flat_targets[i : i + step], reduction="none"
        )
        for i in range(0, len(flat_targets), step)
    ]
    return torch.cat(nll).view(targets.shape).mean(dim=1)


def head_split(model) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` with ``model(x).logits == head(body(x).last_hidden_state)``, or None.

    Found from the model (its ``base_model`` and output embeddings) and checked on a few
    tokens, so a model that changes its logits after the head (soft-capping, a logit scale)
    is scored from its full logits instead (logged).
    """
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is None or body is model or not isinstance(head, nn.Linear):
        return None
    if not _head_split_matches(model, body, head):
        log.info(
            "%s changes its logits after the output head: scoring from full logits",
            type(model).__name__,
        )
        return None
    return body, head


@torch.no_grad()
def _head_split_matches(model, body, head) -> bool:
    device = next(model.parameters()).device
    probe = torch.arange(8, device=device).unsqueeze(0) + 1
    try:
        full = model(input_ids=probe, use_cache=False).logits.float()
        split = head(body(input_ids=probe, use_cache=False).last_hidden_state).float()
    except (TypeError, AttributeError):
        return False
    return full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def perplexity(
    model,
    windows: torch.LongTensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of ``model`` on ``windows`` ``[nwindows, seqlen]``.

    ``exp`` of the mean over windows of each window's mean shifted next-token NLL, computed in
    float32 from the logits (the SparseGPT/Wanda protocol). The model is put in eval mode and is
    assumed to be on ``device`` already; batches are moved there (default: the device of the
    model's first parameter). Raises :class:`SeqlenError` (a ValueError) if ``seqlen`` exceeds
    the model's maximum length.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(
            f"windows must be [nwindows >= 1, seqlen >= 2] token ids, got {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    nwindows, seqlen = windows.shape
    check_seqlen(model, seqlen)
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    split = head_split(model)
    total = 0.0
    starts = range(0, nwindows, batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
        total += window_nlls(model, batch, split).double().sum().item()
    return math.exp(total / nwindows)
