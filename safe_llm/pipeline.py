"""The one path through the system: config -> model + calibration -> engine -> checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from safe_llm import data
from safe_llm.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.config import ConfigError, PruneConfig, make_config
from safe_llm.engine import PruneReport, prune_model
from safe_llm.evaluate import evaluate_perplexity
from safe_llm.methods import build_method
from safe_llm.models import load_model, resolve_device, resolve_dtype
from safe_llm.resume import EngineState, Interrupted, WorkArea, work_dir

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    config: PruneConfig
    report: dict


def evaluate_sources(model, tokenizer, config: PruneConfig, device, progress: bool) -> dict:
    """``{source: result}`` on each ``config.eval`` source (comma lists allowed), with the
    harness of :mod:`safe_llm.evaluate` (token perplexity, SparseGPT/Wanda protocol)."""
    return evaluate_perplexity(
        model,
        tokenizer,
        config.eval,
        config.eval_seqlen or config.seqlen,
        batch_size=config.batch_size,
        device=device,
        max_windows=config.eval_max_windows,
        text_column=config.text_column,
        progress=progress,
    )


def _evaluate_on_device(model, tokenizer, config, device, progress) -> dict:
    if not config.eval:
        return {}
    home = next(model.parameters()).device
    model.to(device)
    try:
        return evaluate_sources(model, tokenizer, config, device, progress)
    finally:
        model.to(home)


def check_prunable(model: nn.Module, pattern, ignore: tuple[str, ...] = ()) -> None:
    """Raise before any calibration work if a block's layer cannot take ``pattern``."""
    _, blocks = find_blocks(model)
    layers = [prunable_layers(block, ignore) for block in blocks]
    if not any(layers):
        raise ConfigError("--ignore excludes every layer of every block; nothing would be pruned")
    for index, block_layers in enumerate(layers):
        for name, layer in block_layers.items():
            pattern.check_shape(tuple(weight_matrix(layer).shape), f"block {index} {name}")


def _open_work_area(config: PruneConfig) -> tuple[WorkArea | None, bool]:
    """``(work area, fresh)`` of a run with ``--output``; on ``--resume`` the saved options
    must match (checked before anything is loaded)."""
    if not config.output:
        return None, True
    work = WorkArea(work_dir(config.output))
    if config.resume and work.exists():
        work.check_config(config.to_dict())
        log.info("resuming %s: %d block(s) already pruned", work.path, work.finished_blocks())
        return work, False
    if config.resume:
        log.info("nothing to resume in %s; starting from block 0", work.path)
    return work, True


def _state_saver(
    work: WorkArea | None,
    fresh: bool,
    config: PruneConfig,
    total: int,
    should_stop: Callable[[], int | None] | None,
) -> Callable[[EngineState, nn.Module], None]:
    """The engine's ``on_state``: save the block's state, then stop if a signal asked to."""
    started = not fresh

    def on_state(state: EngineState, block: nn.Module) -> None:
        nonlocal started
        if work is not None:
            if not started:
                work.start(config.to_dict())
                started = True
            work.save(state, block, total)
        signum = should_stop() if should_stop is not None else None
        if signum:
            raise Interrupted(signum, state.next_block, total, work.path if work else None)

    return on_state


def run_prune(
    config: PruneConfig,
    progress: bool = True,
    should_stop: Callable[[], int | None] | None = None,
) -> PruneResult:
    """Load, calibrate, prune block by block and (optionally) evaluate.

    With ``config.output`` each finished block's state is saved in the output's work area
    (:mod:`safe_llm.resume`), and ``config.resume`` continues from it; nothing else is written.
    ``should_stop`` is polled after each block's save: a signal number there raises
    :class:`~safe_llm.resume.Interrupted`. Every check that does not need the model runs
    before it is loaded, and every check that needs it (pattern shapes, finite weights,
    enough calibration text) before any pruning.
    """
    start = time.perf_counter()
    work, fresh = _open_work_area(config)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    method = build_method(config.method, config.method_options)
    pattern = config.pattern()
    model, tokenizer, _ = load_model(config.model, dtype, config.trust_remote_code)
    check_prunable(model, pattern, tuple(config.ignore))
    windows = data.calibration_windows(
        tokenizer,
        config.dataset,
        config.nsamples,
        config.seqlen,
        config.seed,
        text_column=config.text_column,
    )
    log.info("calibration: %d windows x %d tokens from %s", *windows.shape, config.dataset)
    dense_eval = _evaluate_on_device(model, tokenizer, config, device, progress)
    _, blocks = find_blocks(model)
    resume = work.load(blocks) if work is not None and not fresh else None
    total = len(blocks) if config.max_blocks is None else min(config.max_blocks, len(blocks))
    engine_report: PruneReport = prune_model(
        model,
        windows,
        method,
        pattern,
        device=device,
        batch_size=config.batch_size,
        ignore=tuple(config.ignore),
        dense_targets=config.dense_targets,
        layer_errors=config.layer_errors,
        seed=config.seed,
        max_blocks=config.max_blocks,
        progress=progress,
        resume=resume,
        on_state=_state_saver(work, fresh, config, total, should_stop),
    )
    pruned_eval = _evaluate_on_device(model, tokenizer, config, device, progress)
    report = {
        "model": config.model,
        "command": config.command_line,
        "method": config.method,
        "pattern": pattern.structure,
        "sparsity": pattern.sparsity,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "calibration": {
            "dataset": config.dataset,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
        },
        "evaluation": {"dense": dense_eval, "pruned": pruned_eval},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **engine_report.to_dict(),
        "total_seconds": time.perf_counter() - start,
    }
    return PruneResult(model, tokenizer, config, report)


def prune(model: str, **options) -> tuple[nn.Module, dict]:
    """Python API: prune ``model`` with the options of ``safe-llm prune``.

    Example: ``model, report = prune("smollm2-135m", method="wanda", sparsity=0.5,
    dataset="builtin-c4", nsamples=32, seqlen=512)``. Writes a checkpoint when ``output``
    is given; ``progress=True`` shows progress bars. Returns the pruned model (on the host)
    and the run report.
    """
    from safe_llm.checkpoint import save_checkpoint

    progress = bool(options.pop("progress", False))
    method_options = options.pop("method_options", {})
    call = ", ".join([repr(model), *(f"{k}={v!r}" for k, v in options.items())])
    if method_options:
        call += f", method_options={method_options!r}"
    options.setdefault("command_line", f"safe_llm.prune({call})")
    config = make_config(overrides={"model": model, **options, "method_options": method_options})
    result = run_prune(config, progress=progress)
    if config.output:
        save_checkpoint(result)
    return result.model, result.report
