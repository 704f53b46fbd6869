"""The recover stage's run (``safe-llm prune --recover``, ``safe-llm recover``): the recovery
windows (the run's calibration windows when they are the same), the memory check, the dense
teacher loaded, :func:`~safe_llm.stages.recover.loop.recover` run on the pruned model."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from safe_llm.core import distributed, precision, throughput
from safe_llm.core.memory import large_buffers_from_mmap, return_freed_memory
from safe_llm.io.self_data import SELF, check_can_generate, self_windows
from safe_llm.stages.recover.loop import recover, total_steps
from safe_llm.stages.recover.options import RecoverOptions, RecoveryError
from safe_llm.stages.recover.plan import (
    MEMORY_MODES,
    RecoveryPlan,
    plan_recovery,
    resolve_memory_modes,
)

log = logging.getLogger(__name__)

RECOVERY_MMAP_THRESHOLD = 128 * 2**10  # glibc serves buffers from here on by mmap (recovery)


def recovery_windows(context, options: RecoverOptions) -> tuple[object, dict]:
    """The recovery windows, drawn like calibration windows
    (:func:`safe_llm.io.data.calibration_windows`): by default the run's calibration windows
    themselves (``context.windows``, tokenized once), else ``[n, seqlen]`` drawn here; with a
    token budget a stream of them (:class:`~safe_llm.io.data.TextWindows`); self data: None
    (the teacher makes them once loaded, :func:`_self_windows`). Also ``{dataset, seed,
    seqlen, nsamples}`` as used."""
    from safe_llm.io import data

    config = context.config
    dataset = options.dataset or config.dataset
    seed = options.seed if options.seed is not None else config.seed
    nsamples, seqlen = options.nsamples or config.nsamples, options.seqlen or config.seqlen
    drawn = {"dataset": dataset, "seed": seed, "seqlen": seqlen, "nsamples": nsamples}
    same = (dataset, seed, nsamples, seqlen) == (
        config.dataset,
        config.seed,
        config.nsamples,
        config.seqlen,
    )
    if options.tokens is not None and dataset != SELF:
        stream = data.TextWindows(context.tokenizer, dataset, seqlen, seed, config.text_column)
        return stream, drawn
    if same and context.windows is not None and options.tokens is None:
        return context.windows, drawn
    if dataset == SELF:
        return None, drawn
    windows = data.calibration_windows(
        context.tokenizer, dataset, nsamples, seqlen, seed, text_column=config.text_column
    )
    return windows, drawn


def _self_windows(teacher, context, drawn: dict, count: int, streamed: bool):
    """The teacher's own windows (``--recover-dataset self``): generated where missing (the
    teacher on the run's device), streamed from disk or read into memory."""
    made = self_windows(
        teacher,
        context.tokenizer,
        context.config,
        drawn["seqlen"],
        drawn["seed"],
        count,
        context.progress and distributed.is_writer(),
    )
    drawn["self_data"] = made.describe()
    return made if streamed else made.read(0, count)


# freed gradients and temporaries go back to the OS: from 128 KiB, not 1 MiB, as the lean
# state's packed gradients, moments and indices of the narrow projections (SmolLM2's k/v:
# 0.2-0.9 MB) otherwise fragment the heap (peak +0.1 GB over 4 steps)
@large_buffers_from_mmap(RECOVERY_MMAP_THRESHOLD)
def run_recovery(model: nn.Module, context) -> dict:
    """Recover ``model`` (pruned, on the host) in place against the dense
    ``context.config.model`` (loaded here as the teacher, in the model's dtype) with the
    config's recover options, its training state in the context's ``recover`` state directory;
    returns the recovery report as a dict. The model is back on the host afterwards."""
    from safe_llm.io.models import load_model

    config, device, options = context.config, context.device, context.config.recover
    windows, drawn = recovery_windows(context, options)
    if drawn["dataset"] == SELF:  # the student is of the teacher's class
        check_can_generate(model, "--recover-dataset self")
    return_freed_memory()  # the text and its encodings
    streamed = options.tokens is not None
    held = 0 if streamed else drawn["nsamples"]
    batch = options.batch_size if streamed else min(options.batch_size, held)
    count = total_steps(options, held, drawn["seqlen"]) * batch if streamed else held
    log.info(
        "recovery: %d windows x %d tokens from %s%s; teacher %s",
        count,
        drawn["seqlen"],
        drawn["dataset"],
        " (streamed)" if streamed else "",
        config.model,
    )
    saved = context.saved_state_dir("recover")
    options = _memory_modes(model, options, (batch, drawn["seqlen"], held), device, streamed, saved)
    plan, rate = _plan(model, options, (batch, drawn["seqlen"], held), device, streamed)
    dtype = next(model.parameters()).dtype
    teacher, _, _ = load_model(config.model, dtype, config.trust_remote_code)
    home = next(model.parameters()).device
    if not options.fsdp:  # under FSDP only the shards and what is not in a block go there
        model.to(device)
        teacher.to(device)
    try:
        if windows is None:
            windows = _self_windows(teacher, context, drawn, count, streamed)
        report = recover(
            model,
            teacher,
            windows,
            options,
            device=device,
            dataset=drawn["dataset"],
            seed=drawn["seed"],
            state_dir=context.state_dir("recover"),
            progress=context.progress,
            release_teacher=True,
            matmul_rate=rate,
        )
    finally:
        model.to(home)
        del teacher
    _log_report(report)
    extra = {"self_data": drawn["self_data"]} if "self_data" in drawn else {}
    modes = {name: getattr(options, name) for name in MEMORY_MODES}
    return {**report.to_dict(), **modes, "memory_plan": plan.to_dict(), **extra}


def _log_report(report) -> None:
    log.info(
        "recovery: %d steps, %d tokens, KL %.4f -> %.4f in %.0f s; %.0f tokens/s, %.1f%% of "
        "the dense matmul rate",
        report.steps,
        report.tokens,
        report.losses[0] if report.losses else float("nan"),
        report.losses[-1] if report.losses else float("nan"),
        report.seconds,
        report.tokens_per_second,
        100 * report.flop_fraction,
    )


def _memory_modes(model, options, shape, device, streamed: bool, state_dir) -> RecoverOptions:
    """``options`` with the lean state and checkpointing decided where they are auto
    (:func:`~safe_llm.stages.recover.plan.resolve_memory_modes`), planned as the run will go
    (a streamed run keeps no teacher cache)."""
    batch, seqlen, held = shape
    planned = replace(options, teacher_cache=False) if streamed else options
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    resolved = resolve_memory_modes(model, planned, batch, seqlen, held, device, bf16, state_dir)
    return replace(options, **{name: getattr(resolved, name) for name in MEMORY_MODES})


def _plan(model, options, shape, device, streamed: bool) -> tuple[RecoveryPlan, float]:
    """The memory plan (:func:`_memory_plan`) of ``shape`` = ``(batch, seqlen, windows held)``
    and the time the budget takes at best at the matmul rate measured here (FLOP/s, in the
    compute dtype; returned too). A streamed run keeps its teacher and no cache."""
    batch, seqlen, held = shape
    planned = replace(options, teacher_cache=False) if streamed else options
    plan = _memory_plan(model, planned, batch, seqlen, held, device)
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    dtype = torch.bfloat16 if bf16 else next(model.parameters()).dtype
    rate = throughput.matmul_flops(device, dtype)
    steps = total_steps(options, held or None, seqlen)
    plan.add_time(steps * batch * seqlen, rate)
    log.info("recovery: %s", plan.time_line())
    return plan, rate


def _memory_plan(
    model, options: RecoverOptions, batch: int, seqlen: int, held: int, device
) -> RecoveryPlan:
    """Recovery's estimated peak memory (logged) for ``batch`` windows of ``seqlen`` tokens per
    step, ``held`` windows cached; a :class:`RecoveryError` in one line, with what would
    fit, when it exceeds the device's free memory (unless ``memory_check`` is off)."""
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    plan = plan_recovery(
        model,
        options,
        batch,
        seqlen,
        held,
        torch.device(device),
        bf16,
        distributed.world_size(),
    )
    log.info("recovery: %s", plan.summary())
    if options.memory_check and not plan.fits:
        raise RecoveryError(plan.refusal() + " (--no-recover-memory-check runs it anyway)")
    return plan
