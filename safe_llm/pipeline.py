"""The one path through the system: config -> model + calibration -> engine -> checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safe_llm import data, distributed, precision
from safe_llm.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.config import ConfigError, PruneConfig, make_config, parse_size
from safe_llm.engine import BlockSource, PruneReport, dense_pass, prune_model
from safe_llm.evaluate import evaluate_perplexity
from safe_llm.memory import StagePeaks, return_freed_memory, serve_large_buffers_from_mmap
from safe_llm.methods import build_method
from safe_llm.models import load_model, resolve_device, resolve_dtype
from safe_llm.resume import EngineState, Interrupted, WorkArea, work_dir
from safe_llm.sparsity import (
    SparsityPattern,
    outlier_ratio,
    owl_sparsities,
    weighted_sparsity,
)

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    config: PruneConfig
    report: dict
    # writes config.json and the weights into a directory (given the max shard size), for a
    # model that is not whole in memory (--stream-from-disk); None: model.save_pretrained
    write_weights: Callable[[Path, str], None] | None = None


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


def _block_sizes(blocks: nn.ModuleList, ignore: tuple[str, ...]) -> list[int]:
    """Prunable weights per block."""
    return [
        sum(weight_matrix(layer).numel() for layer in prunable_layers(block, ignore).values())
        for block in blocks
    ]


def _activation_storage(config: PruneConfig) -> dict:
    """The engine's ``activation_budget`` and ``spill_dir`` for ``--max-activation-memory``
    (the memory-mapped streams sit next to ``--output``)."""
    budget = config.max_activation_memory
    return {
        "activation_budget": parse_size(budget) if budget else None,
        "spill_dir": Path(config.output).expanduser().parent if config.output else None,
    }


def block_sparsities(
    config: PruneConfig,
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    source: BlockSource | None = None,
    progress: bool = True,
) -> tuple[list[float], list[float] | None]:
    """``(sparsity of every block, OWL outlier ratios or None)`` for ``config``'s profile.

    OWL takes a dense pass of the calibration windows ``[n, seq]`` through every block (the
    engine's :func:`~safe_llm.engine.dense_pass`) for the Wanda scores' outlier ratios.
    """
    ignore = tuple(config.ignore)
    _, blocks = find_blocks(model)
    sizes = _block_sizes(blocks, ignore)
    target = config.pattern().sparsity
    if config.sparsity_per_block is not None:
        given = config.sparsity_per_block
        if len(given) != len(blocks):
            raise ConfigError(
                f"sparsity_per_block has {len(given)} values but the model has {len(blocks)} "
                "decoder blocks"
            )
        overall = weighted_sparsity(given, sizes)
        if config.sparsity is not None and abs(overall - config.sparsity) > 1e-6:
            raise ConfigError(
                f"sparsity_per_block gives an overall sparsity of {overall:.6g}, --sparsity "
                f"says {config.sparsity:g}: drop --sparsity or make them agree"
            )
        return list(given), None
    if config.sparsity_profile != "owl":
        return [target] * len(blocks), None

    def ratio(_index, layers, stats) -> float:
        names = list(layers)
        weights = [weight_matrix(layers[n]) for n in names]
        return outlier_ratio(weights, [stats[n].norms for n in names], config.owl_m)

    ratios = dense_pass(
        model,
        windows,
        ratio,
        device=device,
        batch_size=config.batch_size,
        ignore=ignore,
        source=source,
        progress=progress,
        **_activation_storage(config),
    )
    sparsities = owl_sparsities(ratios, sizes, target, config.owl_lambda)
    log.info("OWL block sparsities: %s", ", ".join(f"{s:.3f}" for s in sparsities))
    return sparsities, ratios


def _load(config: PruneConfig, dtype: torch.dtype):
    """``(model, tokenizer, block source or None, weight writer factory or None)``."""
    if not config.stream_from_disk:
        model, tokenizer, _ = load_model(config.model, dtype, config.trust_remote_code)
        return model, tokenizer, None, None
    from safe_llm.streaming import DiskBlocks, load_skeleton, write_weights

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
    (:mod:`safe_llm.resume`), and ``config.resume`` continues from it; nothing else is written.
    ``should_stop`` is polled after each block's save: a signal number there raises
    :class:`~safe_llm.resume.Interrupted`. Every check that does not need the model runs
    before it is loaded, and every check that needs it (pattern shapes, finite weights,
    enough calibration text) before any pruning.
    """
    start = time.perf_counter()
    distributed.init_from_env()
    progress = progress and distributed.is_writer()
    work, fresh = _open_work_area(config)
    torch.manual_seed(config.seed)
    device = distributed.local_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    method = build_method(config.method, config.method_options)
    pattern = config.pattern()
    serve_large_buffers_from_mmap()
    peaks = StagePeaks(device)
    with peaks.stage("load"):
        model, tokenizer, source, writer = _load(config, dtype)
    check_prunable(model, pattern, tuple(config.ignore))
    with peaks.stage("calibration_data"):
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
    with peaks.stage("dense_evaluation"):
        dense_eval = _evaluate_on_device(model, tokenizer, config, device, progress)
    with peaks.stage("sparsity_profile"):
        sparsities, outlier_ratios = block_sparsities(
            config, model, windows, device, source, progress
        )
    uniform = len(set(sparsities)) == 1 and sparsities[0] == pattern.sparsity
    patterns = None if uniform else [SparsityPattern.parse("unstructured", s) for s in sparsities]
    _, blocks = find_blocks(model)
    if work is not None and not fresh:
        resume = work.load(None if source is not None else blocks)
    else:
        resume = None
    writes = work if distributed.is_writer() else None
    total = len(blocks) if config.max_blocks is None else min(config.max_blocks, len(blocks))
    with peaks.stage("pruning"):
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
            on_state=_state_saver(writes, fresh, config, total, should_stop),
            block_patterns=patterns,
            source=source,
            **_activation_storage(config),
        )
    with peaks.stage("pruned_evaluation"):
        pruned_eval = _evaluate_on_device(model, tokenizer, config, device, progress)
    report = {
        "model": config.model,
        "command": config.command_line,
        "method": config.method,
        "pattern": pattern.structure,
        "sparsity": pattern.sparsity
        if config.sparsity_per_block is None
        else weighted_sparsity(sparsities, _block_sizes(blocks, tuple(config.ignore))),
        "sparsity_profile": "explicit"
        if config.sparsity_per_block is not None
        else config.sparsity_profile,
        "block_sparsity": sparsities,
        **({"owl_outlier_ratios": outlier_ratios} if outlier_ratios is not None else {}),
        "data_parallel_ranks": distributed.world_size(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "precision": _precision_report(device, dtype, method),
        "calibration": {
            "dataset": config.dataset,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
        },
        "evaluation": {"dense": dense_eval, "pruned": pruned_eval},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **engine_report.to_dict(),
        "stage_peak_memory_bytes": peaks.to_dict(),
        "total_seconds": time.perf_counter() - start,
    }
    write_weights = writer(work, total) if writer is not None and work is not None else None
    return PruneResult(model, tokenizer, config, report, write_weights)


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
