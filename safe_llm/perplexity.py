"""Token perplexity with the SparseGPT/Wanda protocol."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safe_llm.errors import SafeLLMError


class SeqlenError(SafeLLMError):
    """Windows longer than the model's maximum length (they would be silently truncated)."""


def model_max_length(model) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``) of the model's config, if it has one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_seqlen(model, seqlen: int) -> None:
    """Raise :class:`SeqlenError` if ``seqlen`` exceeds the model's maximum length."""
    max_length = model_max_length(model)
    if max_length is not None and seqlen > max_length:
        raise SeqlenError(
            f"seqlen {seqlen} exceeds the model's maximum length {max_length}; "
            f"evaluate with --seqlen {max_length} or less"
        )


def window_nlls(model, batch: torch.LongTensor) -> torch.Tensor:
    """Mean next-token NLL of each window, float32 ``[batch]``, for ``batch`` ``[batch, seqlen]``."""
    logits = model(input_ids=batch, use_cache=False).logits  # [batch, seqlen, vocab]
    shift_logits = logits[:, :-1, :].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return nll.view(targets.shape).mean(dim=1)


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
    total = 0.0
    starts = range(0, nwindows, batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
        total += window_nlls(model, batch).double().sum().item()
    return math.exp(total / nwindows)
