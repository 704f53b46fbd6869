"""Recovery's distillation loss: the KL between the teacher's and the student's next-token
distributions, computed and back-propagated chunk by chunk of tokens, plus the optional
hidden-state term (the derivation: :mod:`safe_llm.stages.recover.loop`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core import distributed
from safe_llm.core.blocks import find_blocks
from safe_llm.stages.recover.options import RecoveryError


def kl_chunk_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student) for logits ``[tokens, vocab]`` (float32)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def chunked_kl_backward(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    chunk: int,
    scale: float,
) -> tuple[float, torch.Tensor]:
    """``(scale * sum of per-token KL, gradient w.r.t. student_hidden)``.

    ``student_hidden`` / ``teacher_hidden``: final hidden states ``[batch, seq, d]``; the heads
    map them to logits. Only ``chunk`` tokens' logits exist at a time: each chunk's KL is
    back-propagated to the hidden state (the heads are frozen) and freed.
    """
    hidden = student_hidden.detach().reshape(-1, student_hidden.shape[-1]).requires_grad_()
    target = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        piece = slice(start, start + chunk)
        with torch.no_grad():
            teacher_logits = teacher_head(target[piece])
        loss = kl_chunk_sum(student_head(hidden[piece]), teacher_logits) * scale
        loss.backward()
        total += loss.detach().double()
    return float(total), hidden.grad.view_as(student_hidden)


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(the model without its head, lm_head)``: body(input_ids)[0] is the final hidden state."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise RecoveryError(
            f"{type(model).__name__} has no separate base model and output embeddings; "
            "recovery needs a transformers causal LM"
        )
    if getattr(model.config, "final_logit_softcapping", None) or hasattr(model, "logit_scale"):
        raise RecoveryError(
            f"{type(model).__name__} transforms its logits after lm_head (soft-capping or "
            "scaling); recovery does not support it yet"
        )
    return body, head


@torch.no_grad()
def teacher_hidden_states(
    teacher: nn.Module, windows: torch.Tensor, batch_size: int, device, progress: bool = False
) -> torch.Tensor:
    """The teacher's final hidden states of every window, ``[n, seq, d]`` on ``device``."""
    body, _ = _body_and_head(teacher)
    out = []
    for start in tqdm(
        range(0, windows.shape[0], batch_size), desc="teacher", unit="batch", disable=not progress
    ):
        ids = windows[start : start + batch_size].to(device)
        out.append(body(input_ids=ids, use_cache=False)[0])
    return torch.cat(out)


def step_loss(student, teacher, windows, batch, options, device, cache) -> float:
    """Forward both models on ``windows[batch]`` (this rank's share), back-propagate the
    chunked KL (plus the hidden-state term) scaled by 1 / (tokens of the whole batch); returns
    this rank's loss share. ``cache``: the teacher's final hidden states of every window, or
    None to run the teacher."""
    body, head = _body_and_head(student)
    teacher_body, teacher_head = _body_and_head(teacher)
    mine = distributed.shard(batch)
    ids = windows[mine].to(device)
    scale = 1.0 / (len(batch) * windows.shape[1])
    with _block_outputs(teacher, options.hidden_weight > 0) as teacher_blocks:
        if cache is not None:
            teacher_hidden = cache[mine.to(cache.device)]
        else:
            with torch.no_grad():
                teacher_hidden = teacher_body(input_ids=ids, use_cache=False)[0]
    with _block_outputs(student, options.hidden_weight > 0) as student_blocks:
        hidden = body(input_ids=ids, use_cache=False)[0]
    loss, grad = chunked_kl_backward(
        hidden, teacher_hidden, head, teacher_head, options.kl_chunk, scale
    )
    if not student_blocks:
        hidden.backward(grad)
        return loss
    term = options.hidden_weight * scale * hidden_state_error(student_blocks, teacher_blocks)
    torch.autograd.backward([hidden, term], [grad, torch.ones_like(term)])
    return loss + float(term.detach())


def hidden_state_error(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over blocks and tokens of ``||s - t||^2 / ||t||^2`` for block outputs
    ``[batch, seq, d]`` (float32 scalar). Normalised per token, so it adds up over ranks and the
    few tokens with huge activations (attention sinks) do not outweigh the rest."""
    total = torch.zeros((), dtype=torch.float32, device=student[0].device)
    for mine, theirs in zip(student, teacher, strict=True):
        theirs = theirs.detach().float()
        error = (mine.float() - theirs).pow(2).sum(-1)
        total = total + (error / theirs.pow(2).sum(-1).clamp_min(1e-12)).sum()
    return total


@contextlib.contextmanager
def _block_outputs(model: nn.Module, on: bool):
    """Within the context, every decoder block's output is appended to the yielded list
    (nothing when ``on`` is false). The hooks are gone when the context exits, so a
    checkpointed block recomputed in the backward is not recorded twice."""
    outputs: list[torch.Tensor] = []
    if not on:
        yield outputs
        return

    def record(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    _, blocks = find_blocks(model)
    handles = [block.register_forward_hook(record) for block in blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
