"""The recover stage's run (``safe-llm prune --recover``, ``safe-llm recover``): the recovery
windows (the run's calibration windows when they are the same), the memory check, the dense
teacher loaded, :func:`~safe_llm.stages.recover.loop.recover` run on the pruned model."""

from __future__ import annotations

import logging

import torch
from torch import nn

from safe_llm.core import distributed, precision
from safe_llm.core.memory import large_buffers_from_mmap, return_freed_memory
from safe_llm.stages.recover.loop import recover
from safe_llm.stages.recover.options import RecoverOptions, RecoveryError
from safe_llm.stages.recover.plan import RecoveryPlan, plan_recovery

log = logging.getLogger(__name__)

RECOVERY_MMAP_THRESHOLD = 128 * 2**10  # glibc serves buffers from here on by mmap (recovery)


def recovery_windows(context, options: RecoverOptions) -> tuple[torch.Tensor, dict]:
    """The recovery windows ``[n, seqlen]`` drawn like calibration windows
    (:func:`safe_llm.io.data.calibration_windows`): by default the run's calibration windows
    themselves (``context.windows``, tokenized once), and ``{dataset, seed}`` as used."""
    from safe_llm.io import data

    config = context.config
    dataset = options.dataset or config.dataset
    seed = options.seed if options.seed is not None else config.seed
    nsamples, seqlen = options.nsamples or config.nsamples, options.seqlen or config.seqlen
    drawn = {"dataset": dataset, "seed": seed}
    same = (dataset, seed, nsamples, seqlen) == (
        config.dataset,
        config.seed,
        config.nsamples,
        config.seqlen,
    )
    if same and context.windows is not None:
        return context.windows, drawn
    windows = data.calibration_windows(
        context.tokenizer, dataset, nsamples, seqlen, seed, text_column=config.text_column
    )
    return windows, drawn


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
    return_freed_memory()  # the text and its encodings
    log.info(
        "recovery: %d windows x %d tokens from %s; teacher %s",
        *windows.shape,
        drawn["dataset"],
        config.model,
    )
    plan = _memory_plan(model, options, windows, device)
    dtype = next(model.parameters()).dtype
    teacher, _, _ = load_model(config.model, dtype, config.trust_remote_code)
    home = next(model.parameters()).device
    if not options.fsdp:  # under FSDP only the shards and what is not in a block go there
        model.to(device)
        teacher.to(device)
    try:
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
        )
    finally:
        model.to(home)
        del teacher
    log.info(
        "recovery: %d steps, %d tokens, KL %.4f -> %.4f in %.0f s",
        report.steps,
        report.tokens,
        report.losses[0] if report.losses else float("nan"),
        report.losses[-1] if report.losses else float("nan"),
        report.seconds,
    )
    return {**report.to_dict(), "memory_plan": plan.to_dict()}


def _memory_plan(model, options: RecoverOptions, windows: torch.Tensor, device) -> RecoveryPlan:
    """Recovery's estimated peak memory (logged); a :class:`RecoveryError` in one line, with
    what would fit, when it exceeds the device's free memory (unless ``memory_check`` is off)."""
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    batch = min(options.batch_size, windows.shape[0])
    plan = plan_recovery(
        model,
        options,
        batch,
        windows.shape[1],
        windows.shape[0],
        torch.device(device),
        bf16,
        distributed.world_size(),
    )
    log.info("recovery: %s", plan.summary())
    if options.memory_check and not plan.fits:
        raise RecoveryError(plan.refusal() + " (--no-recover-memory-check runs it anyway)")
    return plan
