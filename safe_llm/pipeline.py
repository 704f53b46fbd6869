"""The one path through the system: config -> model + calibration -> engine -> checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safe_llm.config import ConfigError, PruneConfig, make_config, parse_size
from safe_llm.core import distributed, precision
from safe_llm.core.blocks import check_coverage, find_blocks, prunable_layers, weight_matrix
from safe_llm.core.memory import StagePeaks, return_freed_memory, serve_large_buffers_from_mmap
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.evaluation.evaluate import evaluate_perplexity
from safe_llm.io import data
from safe_llm.io.models import load_model, resolve_device, resolve_dtype
from safe_llm.io.work_area import EngineState, Interrupted, WorkArea, work_dir
from safe_llm.methods import build_method
from safe_llm.report import RunReport
from safe_llm.stages.profiles import block_sizes, block_sparsities, weighted_sparsity
from safe_llm.stages.prune.engine import EngineOptions, PruneReport, prune_model
from safe_llm.stages.prune.joint import JointOptions

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    config: PruneConfig
    report: RunReport
    # writes config.json and the weights into a directory (given the max shard size), for a
    # model that is not whole in memory (--stream-from-disk); None: model.save_pretrained
    write_weights: Callable[[Path, str], None] | None = None


def evaluate_sources(model, tokenizer, config: PruneConfig, device, progress: bool) -> dict:
    """``{source: result}`` on each ``config.eval`` source (comma lists allowed), with the
    harness of :mod:`safe_llm.evaluation.evaluate` (token perplexity, SparseGPT/Wanda protocol)."""
    return evaluate_perplexity(
        model,
        tokenizer,
        config.eval,
        config.eval_seqlen or config.seqlen,
        batch_size=config.batch_size,
        device=device,
        max_windows=config.eval_max_windows,
        cache=config.eval_cache,
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
    check_coverage(blocks, ignore)


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
    """The engine's ``on_state``: save the finished blocks and the state, then stop if a
    signal asked to."""
    started = not fresh

    def on_state(state: EngineState, blocks: dict[int, nn.Module]) -> None:
        nonlocal started
        if work is not None:
            if not started:
                work.start(config.to_dict())
                started = True
            work.save(state, blocks, total)
        signum = should_stop() if should_stop is not None else None
        if signum:
            raise Interrupted(signum, state.next_block, total, work.path if work else None)

    return on_state


def engine_options(config: PruneConfig, device: torch.device, progress: bool) -> EngineOptions:
    """The engine's options for ``config`` (the memory-mapped activation streams of
    ``--max-activation-memory`` sit next to ``--output``)."""
    budget = config.max_activation_memory
    return EngineOptions(
        device=device,
        batch_size=config.batch_size,
        ignore=tuple(config.ignore),
        dense_targets=config.dense_targets,
        moe_every_token=config.moe_every_token,
        joint=JointOptions(
            blocks=config.joint_blocks,
            epochs=config.joint_epochs,
            lr=config.joint_lr,
            batch_size=config.batch_size,
            autocast=config.method_options.get("autocast", "auto"),  # as the method computes
        ),
        layer_errors=config.layer_errors,
        seed=config.seed,
        max_blocks=config.max_blocks,
        progress=progress,
        activation_budget=parse_size(budget) if budget else None,
        spill_dir=Path(config.output).expanduser().parent if config.output else None,
    )


def _load(config: PruneConfig, dtype: torch.dtype):
    """``(model, tokenizer, block source or None, weight writer factory or None)``."""
    if not config.stream_from_disk:
        model, tokenizer, _ = load_model(config.model, dtype, config.trust_remote_code)
        return model, tokenizer, None, None
    from safe_llm.io.streaming import DiskBlocks, load_skeleton, write_weights

    model, tokenizer, files = load_skeleton(config.model, dtype, config.trust_remote_code)

    def writer(work: WorkArea, pruned: int) -> Callable[[Path, str], None]:
        return lambda directory, size: write_weights(
            model, files, work, pruned, directory, parse_size(size, "--max-shard-size")
        )

    return model, tokenizer, DiskBlocks(model, files), writer


def _precision_report(device: torch.device, dtype: torch.dtype, method) -> dict:
    """The machine's bf16 support and what this run computed in (recorded in report.json)."""
    autocast = getattr(method.options, "autocast", None)
    info = {**precision.describe(device), "dtype": str(dtype).removeprefix("torch.")}
    if autocast is not None:
        bf16 = precision.reduced_precision(autocast, device, f"{method.name} autocast")
        info["autocast"] = "bf16" if bf16 else "off"
    return info


def run_prune(
    config: PruneConfig,
    progress: bool = True,
    should_stop: Callable[[], int | None] | None = None,
) -> PruneResult:
    """Load, calibrate, prune block by block and (optionally) evaluate.

    With ``config.output`` each finished block's state is saved in the output's work area
    (:mod:`safe_llm.io.work_area`), and ``config.resume`` continues from it; nothing else is written
    (:func:`finish_run` writes the checkpoint). ``should_stop`` is polled after each block's
    save: a signal number there raises :class:`~safe_llm.io.work_area.Interrupted`. Every check that
    does not need the model runs before it is loaded, and every check that needs it (pattern
    shapes, finite weights, enough calibration text) before any pruning.
    """
    start = time.perf_counter()
    distributed.init_from_env()
    progress = progress and distributed.is_writer()
    work, fresh = _open_work_area(config)
    torch.manual_seed(config.seed)
    device = distributed.local_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    method = build_method(config.method, config.method_options)
    serve_large_buffers_from_mmap()
    peaks = StagePeaks(device)
    with peaks.stage("load"):
        model, tokenizer, source, writer = _load(config, dtype)
    check_prunable(model, config.pattern(), tuple(config.ignore))
    with peaks.stage("calibration_data"):
        windows = _calibration_windows(config, tokenizer)
    options = engine_options(config, device, progress)
    with peaks.stage("dense_evaluation"):
        dense_eval = _evaluate_on_device(model, tokenizer, config, device, progress)
    with peaks.stage("sparsity_profile"):
        sparsities, outlier_ratios = block_sparsities(config, model, windows, options, source)
    total = _blocks_to_prune(model, config)
    with peaks.stage("pruning"):
        engine_report = prune_model(
            model,
            windows,
            method,
            config.pattern(),
            options,
            block_patterns=_patterns(config.pattern(), sparsities),
            source=source,
            resume=_resume_state(work, fresh, model, streamed=source is not None),
            on_state=_state_saver(
                work if distributed.is_writer() else None, fresh, config, total, should_stop
            ),
        )
    recovery = _recover(model, tokenizer, config, device, work, peaks, progress)
    with peaks.stage("pruned_evaluation"):
        pruned_eval = _evaluate_on_device(model, tokenizer, config, device, progress)
    evaluation = {"dense": dense_eval, "pruned": pruned_eval}
    report = _run_report(config, model, engine_report, (sparsities, outlier_ratios), evaluation)
    report.device, report.dtype = str(device), str(dtype).removeprefix("torch.")
    report.precision = _precision_report(device, dtype, method)
    report.recovery, report.stage_peak_memory_bytes = recovery, peaks.to_dict()
    report.total_seconds = time.perf_counter() - start
    write_weights = writer(work, total) if writer is not None and work is not None else None
    return PruneResult(model, tokenizer, config, report, write_weights)


def _recover(model, tokenizer, config: PruneConfig, device, work, peaks, progress):
    """The recovery stage after the block loop (``--recover``; its own memory stage), or None
    without it; its resumable state lives in the work area (every rank reads it on a resume;
    the writing rank saves it, or under FSDP every rank its own shards)."""
    if not config.recover:
        return None
    from safe_llm.stages.recover.stage import run_recovery

    state_dir = work.path / "recovery" if work is not None else None
    with peaks.stage("recovery"):
        return run_recovery(
            model, tokenizer, config, device, state_dir=state_dir, progress=progress
        )


def _calibration_windows(config: PruneConfig, tokenizer) -> torch.Tensor:
    """The calibration token ids ``[nsamples, seqlen]`` of ``config``."""
    windows = data.calibration_windows(
        tokenizer,
        config.dataset,
        config.nsamples,
        config.seqlen,
        config.seed,
        text_column=config.text_column,
    )
    return_freed_memory()  # the tokenizer's buffers for the whole text
    log.info("calibration: %d windows x %d tokens from %s", *windows.shape, config.dataset)
    return windows


def _blocks_to_prune(model: nn.Module, config: PruneConfig) -> int:
    _, blocks = find_blocks(model)
    return len(blocks) if config.max_blocks is None else min(config.max_blocks, len(blocks))


def _patterns(pattern: SparsityPattern, sparsities: list[float]) -> list[SparsityPattern] | None:
    """One pattern per block for a non-uniform profile, else None (``pattern`` for all)."""
    if len(set(sparsities)) == 1 and sparsities[0] == pattern.sparsity:
        return None
    return [SparsityPattern.parse("unstructured", s) for s in sparsities]


def _resume_state(
    work: WorkArea | None, fresh: bool, model: nn.Module, streamed: bool
) -> EngineState | None:
    """The state a resumed run continues from (its finished blocks put into ``model``,
    unless streamed: those stay in the work area), or None for a fresh run."""
    if work is None or fresh:
        return None
    _, blocks = find_blocks(model)
    return work.load(None if streamed else blocks)


def _run_report(
    config: PruneConfig,
    model: nn.Module,
    engine_report: PruneReport,
    profile: tuple[list[float], list[float] | None],
    evaluation: dict,
) -> RunReport:
    """The :class:`RunReport` of a run from the engine's report, the block sparsities and
    OWL ratios (``profile``) and the evaluation; the caller sets device, dtype, precision,
    the stages' peak memory and the total time."""
    sparsities, outlier_ratios = profile
    _, blocks = find_blocks(model)
    explicit = config.sparsity_per_block is not None
    pattern = config.pattern()
    return RunReport.from_engine(
        engine_report,
        model=config.model,
        command=config.command_line,
        method=config.method,
        pattern=pattern.structure,
        sparsity=weighted_sparsity(sparsities, block_sizes(blocks, tuple(config.ignore)))
        if explicit
        else pattern.sparsity,
        sparsity_profile="explicit" if explicit else config.sparsity_profile,
        block_sparsity=sparsities,
        owl_outlier_ratios=outlier_ratios,
        data_parallel_ranks=distributed.world_size(),
        device="",
        dtype="",
        calibration={
            "dataset": config.dataset,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
        },
        evaluation=evaluation,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def finish_run(result: PruneResult) -> str | None:
    """The one way a run ends, for the CLI and :func:`prune` alike: the writing rank (rank 0,
    or the only process) saves the checkpoint when ``config.output`` is set, the process group
    is released, then the writing rank uploads the checkpoint with ``config.push_to_hub``.
    Returns the Hub commit URL when it pushed, else None."""
    from safe_llm.io.checkpoint import save_checkpoint

    config = result.config
    writer = distributed.is_writer()
    try:
        if writer and config.output:
            save_checkpoint(result)
    finally:
        distributed.shutdown()
    if not (writer and config.push_to_hub):
        return None
    from safe_llm.io.hub import push_checkpoint

    url = push_checkpoint(
        config.output, config.hub_repo_id, private=config.hub_private, revision=config.hub_revision
    )
    log.info("pushed to %s", url)
    return url


def prune(model: str, **options) -> tuple[nn.Module, RunReport]:
    """Python API: prune ``model`` with the options of ``safe-llm prune``.

    Example: ``model, report = prune("smollm2-135m", method="wanda", sparsity=0.5,
    dataset="builtin-c4", nsamples=32, seqlen=512)``. Writes a checkpoint when ``output``
    is given (and uploads it with ``push_to_hub``; under ``torchrun`` rank 0 alone writes);
    ``progress=True`` shows progress bars. Returns the pruned model (on the host) and the
    run report (:class:`~safe_llm.report.RunReport`; ``report["key"]`` reads the
    ``report.json`` view).
    """
    progress = bool(options.pop("progress", False))
    method_options = options.pop("method_options", {})
    call = ", ".join([repr(model), *(f"{k}={v!r}" for k, v in options.items())])
    if method_options:
        call += f", method_options={method_options!r}"
    options.setdefault("command_line", f"safe_llm.prune({call})")
    config = make_config(overrides={"model": model, **options, "method_options": method_options})
    result = run_prune(config, progress=progress)
    finish_run(result)
    return result.model, result.report
