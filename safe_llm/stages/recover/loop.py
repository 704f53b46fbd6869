"""Sparse recovery: train the whole pruned model end to end, its mask frozen, to match the
dense model's next-token distribution (knowledge distillation).

The block loop reconstructs one block at a time against calibration data; whatever error it
leaves compounds through the depth of the model. Recovery trains every kept weight (and,
optionally, the norms) of the pruned *student* through the whole model so that its
next-token distribution matches the dense *teacher*'s:

    loss = mean over tokens t of  KL( p_teacher(. | x_<t) || p_student(. | x_<t) )

plus, with ``hidden_weight`` > 0, that weight times the sum over blocks of each token's block
output error ``||s - t||^2 / ||t||^2`` (measured on SmolLM2: it did not help; off by default).

* The sparsity mask is frozen: with the lean state (default, :mod:`safe_llm.train.masked_adam`) only
  the kept entries have a gradient and Adam moments, and the pruned ones end every step at
  exactly +0.0; with ``lean`` off the gradient is masked before each ``torch.optim.Adam`` step
  and the mask re-applied after it. The mask is checked again before anything is saved.
* The teacher's logits are computed on the fly without gradients. Neither model's full
  ``[batch, seq, vocab]`` logits are ever held: the student's last hidden state is cut from the
  graph, the KL is computed and back-propagated chunk by chunk of tokens, and the gradient
  reaching the hidden state is then sent back through the blocks once.
* Embeddings and ``lm_head`` are frozen, and the teacher uses the student's tensors where the
  two hold the same ones (they are never pruned), so they are in memory once.
* Gradient checkpointing (on by default) keeps one block's activations at a time.
* A non-finite loss or gradient stops the run with an error before the step is taken.
* With ``state_dir`` the optimiser, the trained weights and the RNG are saved every
  ``save_every`` steps (each file written atomically); a rerun continues from there and ends
  with the same weights bit for bit (on CPU).
* Under ``torchrun`` each rank takes its share of each batch's windows; the gradients are
  summed over ranks, so every rank takes the same step as a single process would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core import distributed, precision, throughput
from safe_llm.core.memory import return_freed_memory
from safe_llm.stages.recover import fsdp
from safe_llm.stages.recover.loss import step_loss, teacher_hidden_states
from safe_llm.stages.recover.options import RecoverOptions, RecoveryError
from safe_llm.stages.recover.parameters import (
    check_finite_parameters,
    check_masks,
    share_frozen_tensors,
    sparsity_masks,
    trainable_parameters,
)
from safe_llm.stages.recover.plan import PROBE_STEPS, estimate_seconds, resolve_memory_modes
from safe_llm.stages.recover.state import any_sharded, load_state, save_state
from safe_llm.train import relative_adam
from safe_llm.train.data_parallel import sum_over_ranks
from safe_llm.train.masked_adam import BitMask, MaskedAdam

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    method: str
    dataset: str
    nsamples: int
    seqlen: int
    seed: int
    steps: int
    tokens: int
    lr: float
    warmup_steps: int
    step_scale: str
    batch_size: int
    train: list[str]
    hidden_weight: float
    fsdp: bool
    autocast_bf16: bool
    optimizer: str
    trainable_parameters: int
    shared_with_teacher: list[str]
    losses: list[float]
    seconds: float
    resumed_from_step: int = 0
    streamed: bool = False  # windows streamed (a token budget), not held in memory
    train_seconds: float = 0.0  # the step loop's wall time (this process's steps)
    planned_seconds: float | None = None  # the step loop's estimate after its first steps
    tokens_per_second: float = 0.0
    matmul_flops_per_second: float = 0.0  # dense matmul rate, device and compute dtype
    flop_fraction: float = 0.0  # 6 x parameters x tokens/s over that rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def total_steps(options: RecoverOptions, nsamples: int | None, seqlen: int) -> int:
    """Optimiser steps of the budget: ``steps``, else ``tokens`` / (batch x seqlen) rounded
    up, else one pass over the ``nsamples`` windows."""
    if options.steps is not None:
        return options.steps
    per_step = options.batch_size * seqlen
    tokens = options.tokens if options.tokens is not None else nsamples * seqlen
    return max(1, math.ceil(tokens / per_step))


class _Batches:
    """The windows of each step. Held in memory (``windows`` ``[n, seqlen]``): a seeded
    permutation per pass (:func:`_batch_indices`), with the teacher's cached states. Streamed
    (an object with ``seqlen`` and ``batches(start, size)``, e.g.
    :class:`~safe_llm.io.data.TextWindows`): the next ``batch_size`` windows in order from
    window ``first x batch_size`` on, the teacher run on each batch."""

    def __init__(self, windows, batch_size: int, seed: int, cache, first: int):
        self.windows, self.batch_size, self.seed, self.cache = windows, batch_size, seed, cache
        self.streamed = not isinstance(windows, torch.Tensor)
        if self.streamed:
            self._stream = iter(windows.batches(first * batch_size, batch_size))

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(windows, indices of the step's batch in them, teacher states or None)``."""
        if not self.streamed:
            order = _batch_indices(step, self.windows.shape[0], self.batch_size, self.seed)
            return self.windows, order, self.cache
        ids = next(self._stream, None)
        if ids is None or len(ids) < self.batch_size:
            raise RecoveryError(f"recovery step {step}: the window stream ran out")
        return ids, torch.arange(len(ids)), None


def _batch_indices(step: int, nwindows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Windows of step ``step``: consecutive slices of one seeded permutation per pass (a pure
    function of the step, so a resumed run draws the same batches)."""
    per_pass = max(1, nwindows // batch_size)
    epoch, offset = divmod(step, per_pass)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(nwindows, generator=generator)
    return order[offset * batch_size : (offset + 1) * batch_size]


def recover(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    options: RecoverOptions,
    *,
    device: torch.device | str = "cpu",
    dataset: str = "",
    seed: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
    release_teacher: bool = False,
    matmul_rate: float | None = None,
) -> RecoveryReport:
    """Distil ``teacher`` into the pruned ``student`` on ``windows`` ``[n, seqlen]`` in place,
    or on a stream of windows (``seqlen``, ``batches(start, size)``; needs ``options.tokens``
    or ``steps``) taken in order, the teacher run on each batch.

    The student's zeros (its sparsity mask) are frozen. Both models must be on ``device``;
    with ``options.fsdp`` they may be on the host: their blocks are sharded onto ``device``.
    ``seed`` orders the windows; ``state_dir`` makes the run resumable (see the module doc).
    ``release_teacher`` (with the lean state and the teacher cache): free the teacher's tensors
    but the shared ones once its hidden states are cached; the teacher cannot run after.
    ``matmul_rate``: the device's dense matmul FLOP/s in the compute dtype (measured when
    None) for the report's ``flop_fraction``.
    Raises :class:`RecoveryError` on a non-finite loss, gradient or weight, or a moved mask.
    """
    start = time.perf_counter()
    streamed, seqlen, steps, batch_size = _budget(windows, options)
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    held = 0 if streamed or not options.teacher_cache else len(windows)
    options = resolve_memory_modes(
        student, options, batch_size, seqlen, held, device, bf16, state_dir
    )
    masks = _masks(student, _lean(options))
    teacher.requires_grad_(False).eval()
    shared = share_frozen_tensors(student, teacher)
    state_path = Path(state_dir) if state_dir is not None else None
    with (
        fsdp.sharded_blocks(student, torch.device(device), on=options.fsdp),
        fsdp.sharded_blocks(teacher, torch.device(device), on=options.fsdp, keep=False),
    ):
        training = _training(student, options, masks, (steps, batch_size, seed), state_path, bf16)
        release = student if release_teacher else None
        source = None if streamed else windows  # a stream's teacher runs batch by batch
        cache = _teacher_cache(
            teacher, source, options, batch_size, device, bf16, release, progress
        )
        batches = _Batches(windows, batch_size, seed, cache, training.first)
        _train(student, teacher, batches, training, options, device, state_path, progress)
    run = {"dataset": dataset, "seed": seed, "shared": shared, "bf16": bf16, "start": start}
    return _finish(student, windows, options, training, masks, run, device, matmul_rate)


def _finish(student, windows, options, training, masks, run, device, matmul_rate):
    """Check the trained weights (finite) and the mask (unmoved); the
    :class:`RecoveryReport` (``run``: dataset, seed, tensors shared with the teacher, bf16,
    start time)."""
    streamed, seqlen, steps, batch_size = _budget(windows, options)
    params = {n: p for n, p in student.named_parameters() if n in training.params}
    check_finite_parameters(params, steps)
    check_masks(student, masks)
    seconds = time.perf_counter() - run["start"]
    measured = _throughput(student, training, batch_size * seqlen, device, run["bf16"], matmul_rate)
    return RecoveryReport(
        method="distill",
        dataset=run["dataset"],
        nsamples=steps * batch_size if streamed else int(windows.shape[0]),
        seqlen=seqlen,
        seed=run["seed"],
        steps=steps,
        tokens=steps * batch_size * seqlen,
        **_settings(options, batch_size),
        autocast_bf16=run["bf16"],
        trainable_parameters=sum(p.numel() for p in params.values()),
        shared_with_teacher=run["shared"],
        losses=training.losses,
        seconds=seconds,
        resumed_from_step=training.first,
        streamed=streamed,
        **measured,
    )


def _budget(windows, options: RecoverOptions) -> tuple[bool, int, int, int]:
    """``(streamed, seqlen, steps, batch size)`` of recovering on ``windows`` (a tensor held
    in memory or a stream)."""
    streamed = not isinstance(windows, torch.Tensor)
    seqlen = int(windows.seqlen if streamed else windows.shape[1])
    steps = total_steps(options, None if streamed else windows.shape[0], seqlen)
    batch_size = options.batch_size if streamed else min(options.batch_size, windows.shape[0])
    return streamed, seqlen, steps, batch_size


def _throughput(student, training, tokens_per_step, device, bf16, matmul_rate) -> dict:
    """The step loop's tokens/s and its share of the dense matmul rate (measured here in the
    compute dtype unless given), as :class:`RecoveryReport` fields."""
    done = training.steps - training.first
    seconds = training.seconds
    tokens_per_second = done * tokens_per_step / seconds if seconds > 0 else 0.0
    if matmul_rate is None:
        dtype = torch.bfloat16 if bf16 else next(student.parameters()).dtype
        matmul_rate = throughput.matmul_flops(device, dtype)
    parameters = sum(p.numel() for p in {id(p): p for p in student.parameters()}.values())
    return {
        "train_seconds": seconds,
        "planned_seconds": training.planned_seconds,
        "tokens_per_second": tokens_per_second,
        "matmul_flops_per_second": matmul_rate,
        "flop_fraction": throughput.flop_fraction(parameters, tokens_per_second, matmul_rate),
    }


def _teacher_cache(teacher, windows, options, batch_size, device, bf16, release, progress):
    """The teacher's final hidden states ``[n, seq, d]`` of every window, or None where the
    teacher runs at every step (``--no-recover-teacher-cache``, the hidden-state term, or
    streamed windows: ``windows`` None).
    ``release``: the student, whose tensors the teacher keeps, the rest of the teacher freed
    once its states are cached (with the lean state), or None."""
    if windows is None or not options.teacher_cache or options.hidden_weight > 0:
        return None
    with precision.bf16_autocast(device, bf16):
        cache = teacher_hidden_states(teacher, windows, batch_size, device, progress)
    if release is not None and _lean(options):
        _release_teacher(teacher, release)
    return cache


def _training(student, options, masks, schedule, state_path, bf16) -> _Training:
    """The trainable parameters (shards of them under FSDP), their optimiser and masks, and
    the step to start from (from the saved state when there is one). ``masks``: the
    student's (:func:`_masks`); ``schedule``: ``(steps, batch size, seed)``."""
    steps, batch_size, seed = schedule
    if options.fsdp:  # the blocks were replaced by sharded copies: their masks, sharded
        masks = sparsity_masks(student)
    params = trainable_parameters(student, masks, options.train)
    relative = options.step_scale == "relative"
    units = relative_adam.step_units(params.values(), relative, "recovery", whole=fsdp.full)
    groups = relative_adam.trainable_groups(list(params.values()), units)
    if _lean(options):
        pruned = [masks.get(name) for name in params]
        optimizer = MaskedAdam(groups, pruned, lr=options.lr, betas=relative_adam.BETAS)
        masked = []  # MaskedAdam leaves every pruned entry at +0.0 after each step
    else:
        optimizer = relative_adam.adam(groups, options.lr)
        masked = [(params[n], m) for n, m in masks.items() if n in params]
    first, losses = _resume_point(state_path, params, optimizer, steps)
    return _Training(params, optimizer, masked, first, steps, batch_size, seed, losses, bf16)


def _lean(options: RecoverOptions) -> bool:
    """Whether the lean state is used: ``--recover-lean`` (default) without FSDP (sharded
    runs keep torch.optim.Adam over their shards)."""
    return options.lean and not options.fsdp


def _masks(student: nn.Module, lean: bool) -> dict:
    """The student's pruned masks: bool tensors, or :class:`BitMask` with the lean state (one
    tensor unpacked at a time)."""
    return sparsity_masks(student, BitMask if lean else None)


@torch.no_grad()
def _release_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Free every tensor of ``teacher`` that is not one of ``student``'s (its blocks and final
    norm; the shared embeddings and head stay): each is replaced by a meta tensor. A model
    loaded from safetensors is memory-mapped, and the file's pages stay resident until every
    tensor read from it is gone."""
    keep = {id(t) for t in (*student.parameters(), *student.buffers())}
    for module in teacher.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in keep:
                    meta = tensor.to("meta")
                    table[name] = nn.Parameter(meta, False) if name in module._parameters else meta
    return_freed_memory()


def _resume_point(state_path: Path | None, params, optimizer, steps: int) -> tuple[int, list]:
    """``(first step, losses so far)``: from the saved state when there is one."""
    first, losses = load_state(state_path, params, optimizer) if state_path else (0, [])
    if first:
        log.info("recovery: resuming at step %d of %d", first, steps)
    return first, losses


def _settings(options: RecoverOptions, batch_size: int) -> dict:
    """The recovery settings a :class:`RecoveryReport` records."""
    return {
        "lr": options.lr,
        "warmup_steps": options.warmup_steps,
        "step_scale": options.step_scale,
        "batch_size": batch_size,
        "train": list(options.train),
        "hidden_weight": options.hidden_weight,
        "fsdp": options.fsdp,
        "optimizer": "lean" if _lean(options) else "adam",
    }


@dataclass
class _Training:
    """What the step loop works on: trainable parameters, their optimiser, the pruned
    ``(parameter, mask)`` pairs, the step range and batch size, the seed ordering the windows,
    and the losses so far (appended to)."""

    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    masked: list
    first: int
    steps: int
    batch_size: int
    seed: int
    losses: list[float]
    bf16: bool = False
    seconds: float = 0.0  # the step loop's wall time
    planned_seconds: float | None = None  # its estimate after the probe steps


def _train(
    student, teacher, batches: _Batches, training: _Training, options, device, state_path, progress
) -> None:
    """The recovery's step loop; the state is saved every ``options.save_every`` steps. After
    :data:`~safe_llm.stages.recover.plan.PROBE_STEPS` steps the loop's time is estimated
    (logged, ``training.planned_seconds``); the bar shows tokens/s."""
    params, optimizer, masked = training.params, training.optimizer, training.masked
    first, steps = training.first, training.steps
    losses = training.losses
    was_training = student.training
    if options.gradient_checkpointing:
        _checkpointing(student, True)
    student.train()
    lean = isinstance(optimizer, MaskedAdam)
    if lean:
        optimizer.attach()
    # the lean state under checkpointing: no bf16 copy of every weight for the whole step
    cache = not (lean and options.gradient_checkpointing)
    schedule = relative_adam.LinearSchedule(options.lr, steps, options.warmup_steps)
    bar = tqdm(range(first, steps), desc="recovery", unit="step", disable=not progress)
    clock = [time.perf_counter()]  # the loop's start, then the end of each step
    try:
        for step in bar:
            schedule.apply(optimizer, step)
            windows, batch, hidden = batches.at(step)
            # autocast per step: its cache of bf16 weight copies must not outlive the update
            with precision.bf16_autocast(device, training.bf16, cache):
                loss = step_loss(student, teacher, windows, batch, options, device, hidden)
            finish_step(optimizer, params, masked, options, step, loss)
            return_freed_memory()  # the step's freed temporaries, wherever they lie in the heap
            losses.append(sum_over_ranks(loss, device))
            _timed(bar, clock, training, losses[-1], len(batch) * windows.shape[1])
            if _save_due(state_path, step + 1, steps, options.save_every):
                save_state(state_path, step + 1, params, optimizer, losses)
    finally:
        training.seconds = time.perf_counter() - clock[0]
        bar.close()
        if lean:
            optimizer.close()  # hooks removed, pruned entries zero again after an error
        student.train(was_training)
        if options.gradient_checkpointing:
            _checkpointing(student, False)
        for param in params.values():
            param.requires_grad_(False)


def _timed(bar, clock: list[float], training: _Training, loss: float, tokens: int) -> None:
    """After a step: its time on ``clock``, the bar's loss and tokens/s, and the time plan
    once the probe steps are done."""
    clock.append(time.perf_counter())
    seconds = clock[-1] - clock[-2]
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
    done = len(clock) - 1
    if done == PROBE_STEPS + 1:  # the first step warms up; the next PROBE_STEPS are timed
        timed = [b - a for a, b in zip(clock[1:], clock[2:], strict=False)]
        left = training.steps - training.first - done
        training.planned_seconds = estimate_seconds(timed, left, clock[-1] - clock[0])
        log.info(
            "recovery: about %.0f s for the loop's %d steps of %d tokens (%.3f s per step, "
            "measured on %d steps)",
            training.planned_seconds,
            training.steps - training.first,
            tokens,
            sorted(timed)[len(timed) // 2],
            len(timed),
        )


def _save_due(state_path: Path | None, done: int, steps: int, every: int) -> bool:
    """Whether the training state is due after ``done`` steps (:func:`save_state` decides
    which ranks write it)."""
    return state_path is not None and done % every == 0 and done < steps


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn transformers' activation (gradient) checkpointing on or off, non-reentrant."""
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def finish_step(optimizer, params, masked, options, step, loss) -> None:
    """Sum gradients over ranks (FSDP has summed the sharded ones), mask them, check them,
    step, re-apply the mask."""
    if isinstance(optimizer, MaskedAdam):
        _finish_lean_step(optimizer, options, step, loss)
        return
    grads = [p.grad for p in params.values() if p.grad is not None]
    distributed.all_reduce_sum_([g for g in grads if not fsdp.is_sharded(g)])
    relative_adam.mask_grads_(masked)
    with torch.no_grad():
        limit = options.grad_clip if options.grad_clip > 0 else math.inf
        if any_sharded(params):
            norm = _clip_sharded(grads, limit)
        else:
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), limit)
    _check_finite_step(step, loss, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    relative_adam.zero_pruned_(masked)


def _finish_lean_step(optimizer: MaskedAdam, options, step, loss) -> None:
    """The lean state's :func:`finish_step`: its packed gradients summed over ranks, clipped
    to the global norm, checked, then the step (pruned entries end exactly zero)."""
    if distributed.active():
        optimizer.all_reduce_(distributed.all_reduce_sum_)
    norm = optimizer.clip_grad_norm_(options.grad_clip if options.grad_clip > 0 else math.inf)
    _check_finite_step(step, loss, norm)
    optimizer.step()


def _check_finite_step(step: int, loss: float, norm: torch.Tensor) -> None:
    if not math.isfinite(loss) or not torch.isfinite(norm):
        raise RecoveryError(
            f"recovery step {step}: the loss ({loss}) or gradient norm ({float(norm)}) is not "
            "finite; nothing was saved. Lower --recover-lr, or check the teacher and windows"
        )


@torch.no_grad()
def _clip_sharded(grads: list[torch.Tensor], limit: float) -> torch.Tensor:
    """Clip gradients, some of them FSDP shards, to the global norm ``limit``; return the
    norm before clipping (the same on every rank)."""
    device = fsdp.local(grads[0]).device
    shard_sum = torch.zeros((), device=device)
    whole_sum = torch.zeros((), device=device)
    for g in grads:
        part = fsdp.local(g).float().square().sum()
        if fsdp.is_sharded(g):
            shard_sum += part
        else:
            whole_sum += part
    distributed.all_reduce_sum_([shard_sum])
    norm = (shard_sum + whole_sum).sqrt()
    factor = (limit / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        fsdp.local(g).mul_(factor)
    return norm
