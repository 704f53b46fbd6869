"""The one path through the system: config -> model + calibration -> the registered stages
in order (:mod:`safe_llm.stages.base`) -> checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safe_llm.config import (
    ConfigError,
    RunConfig,
    load_recipe,
    make_config,
    make_method,
    unknown_recipe_keys,
)
from safe_llm.core import distributed, precision
from safe_llm.core.blocks import check_prunable, find_blocks
from safe_llm.core.memory import StagePeaks, large_buffers_from_mmap, return_freed_memory
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.core.walker import WalkOptions
from safe_llm.evaluation.perplexity import refuse_long_windows
from safe_llm.io import data
from safe_llm.io.models import context_length, load_model, resolve_device, resolve_dtype
from safe_llm.io.self_data import SELF, check_can_generate, self_windows
from safe_llm.io.work_area import WorkArea, work_dir
from safe_llm.options import parse_size
from safe_llm.report import RunReport
from safe_llm.stages.base import RunContext, registered_stages

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    config: RunConfig
    report: RunReport
    # writes config.json and the weights into a directory (given the max shard size), for a
    # model that is not whole in memory (--stream-from-disk); None: model.save_pretrained
    write_weights: Callable[[Path, str], None] | None = None


def check_windows(config: RunConfig) -> None:
    """Refuse windows longer than the model's context (``--seqlen``, ``--eval-seqlen``,
    ``--recover-seqlen``), read from its config before any weight is loaded."""
    limit = context_length(config.model, config.trust_remote_code)
    refuse_long_windows(config.seqlen, limit)
    if config.eval:
        refuse_long_windows(config.eval_seqlen or config.seqlen, limit, "--eval-seqlen")
    if config.recover.enabled:
        refuse_long_windows(config.recover.seqlen, limit, "--recover-seqlen")


def open_work_area(config: RunConfig) -> tuple[WorkArea | None, bool]:
    """``(work area, fresh)`` of a run with ``--output``; on ``--resume`` the saved options
    must match (checked before anything is loaded)."""
    if not config.output:
        return None, True
    work = WorkArea(work_dir(config.output))
    if config.resume and work.exists():
        work.check_config(config.decisive_options())
        log.info("resuming %s: %d block(s) already pruned", work.path, work.finished_blocks())
        return work, False
    if config.resume:
        log.info("nothing to resume in %s; starting from block 0", work.path)
    if distributed.is_writer():  # --overwrite: no state of an earlier run may be resumed
        work.remove()
    distributed.barrier()
    return work, True


def run_stages(model: nn.Module, context: RunContext, command: str = "prune") -> None:
    """Run every registered stage of ``command`` that ``context.config`` enables, in order,
    over ``model``: each result is recorded in ``context.report`` and, once the stage has
    finished, in the work area; a stage that finished before a resume is not run again (its
    saved result is recorded, and :meth:`~safe_llm.stages.base.Stage.restore` brings the
    model to its state after it)."""
    work = context.work
    finished = work.finished_stages() if work is not None and not context.fresh else {}
    for cls in registered_stages():
        if command not in cls.commands or not cls.enabled(context.config):
            continue
        stage = cls()
        if cls.name in finished:
            result = stage.from_document(finished[cls.name])
            stage.restore(model, context, result)
            log.info("stage %s: finished before the resume", cls.name)
        else:
            with context.peaks.stage(cls.name):
                result = stage.run(model, context)
            if work is not None and context.writes:
                context.start_work_area()
                work.finish_stage(cls.name, stage.document(result))
        context.results[cls.name] = result
        stage.record(context.report, result)


def _load(config: RunConfig, dtype: torch.dtype):
    """``(model, tokenizer, block source or None, weights writer or None)``: the writer, given
    the work area and the number of pruned blocks, writes the streamed checkpoint's weights."""
    if not config.stream_from_disk:
        model, tokenizer, _ = load_model(config.model, dtype, config.trust_remote_code)
        return model, tokenizer, None, None
    from safe_llm.io.streaming import DiskBlocks, load_skeleton, write_weights

    model, tokenizer, files = load_skeleton(config.model, dtype, config.trust_remote_code)

    def weights_writer(work: WorkArea, pruned: int) -> Callable[[Path, str], None]:
        return lambda directory, size: write_weights(
            model, files, work, pruned, directory, parse_size(size, "--max-shard-size")
        )

    return model, tokenizer, DiskBlocks(model, files), weights_writer


def precision_report(device: torch.device, dtype: torch.dtype, method) -> dict:
    """The machine's bf16 support and what this run computed in (recorded in report.json)."""
    autocast = getattr(method.options, "autocast", None)
    info = {**precision.describe(device), "dtype": str(dtype).removeprefix("torch.")}
    if autocast is not None:
        bf16 = precision.reduced_precision(autocast, device, f"{method.name} autocast")
        info["autocast"] = "bf16" if bf16 else "off"
    return info


def walk_options(config: RunConfig, device: torch.device, progress: bool) -> WalkOptions:
    """How the run walks the blocks (the memory-mapped activation streams of
    ``--max-activation-memory`` sit next to ``--output``)."""
    budget = config.max_activation_memory
    return WalkOptions(
        device=device,
        batch_size=config.batch_size,
        ignore=tuple(config.ignore),
        progress=progress,
        activation_budget=parse_size(budget) if budget else None,
        spill_dir=Path(config.output).expanduser().parent if config.output else None,
    )


@large_buffers_from_mmap()  # freed activations go back to the OS at once
def run_prune(
    config: RunConfig,
    progress: bool = True,
    should_stop: Callable[[], int | None] | None = None,
) -> PruneResult:
    """Load, calibrate and run the stages (profile, block loop, recovery, evaluation...).

    With ``config.output`` each finished block's state and each finished stage are saved in
    the output's work area (:mod:`safe_llm.io.work_area`), and ``config.resume`` continues
    from it; nothing else is written (:func:`finish_run` writes the checkpoint).
    ``should_stop`` is polled after each block's save: a signal number there raises
    :class:`~safe_llm.io.work_area.Interrupted`. Every check that does not need the model runs
    before it is loaded, and every check that needs it (pattern shapes, finite weights, enough
    calibration text) before any pruning.
    """
    start = time.perf_counter()
    distributed.init_from_env()
    work, fresh = open_work_area(config)
    torch.manual_seed(config.seed)
    device = distributed.local_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    method = make_method(config.method, config.method_options)
    check_windows(config)
    pattern, peaks = config.pattern(), StagePeaks(device)
    with peaks.stage("load"):
        model, tokenizer, source, weights_writer = _load(config, dtype)
    _, blocks = find_blocks(model)
    check_prunable(blocks, pattern, tuple(config.ignore))
    _check_generation(config, model)
    walk = walk_options(config, device, progress and distributed.is_writer())
    with peaks.stage("calibration_data"):
        windows, made = _calibration_windows(config, tokenizer, model, device, walk.progress)
    context = RunContext(
        config,
        device,
        dtype,
        tokenizer,
        windows,
        new_report(config, pattern, made),
        peaks,
        pattern,
        blocks,
        walk,
        method=method,
        work=work,
        fresh=fresh,
        writes=distributed.is_writer(),
        source=source,
        should_stop=should_stop,
    )
    run_stages(model, context)
    report = context.report
    report.device, report.dtype = str(device), str(dtype).removeprefix("torch.")
    report.precision = precision_report(device, dtype, method)
    report.stage_peak_memory_bytes = peaks.to_dict()
    report.total_seconds = time.perf_counter() - start
    write_weights = None
    if weights_writer is not None and work is not None:
        write_weights = weights_writer(work, context.blocks_to_prune)
    return PruneResult(model, tokenizer, config, report, write_weights)


def _check_generation(config: RunConfig, model: nn.Module) -> None:
    """``--dataset self`` / ``--recover-dataset self`` need a model that generates (checked
    once it is loaded, before any window is made or block pruned)."""
    if config.dataset == SELF:
        check_can_generate(model)
    if config.recover.enabled and config.recover.dataset == SELF:
        check_can_generate(model, "--recover-dataset self")


def new_report(config: RunConfig, pattern: SparsityPattern, self_data=None) -> RunReport:
    """The run's report before any stage ran: what the options say (the stages fill in the
    rest); ``self_data``: what the self-generated calibration windows were, if any."""
    extra = {"self_data": self_data} if self_data is not None else {}
    return RunReport(
        model=config.model,
        command=config.command_line,
        method=config.method,
        pattern=pattern.structure,
        sparsity=pattern.sparsity,
        data_parallel_ranks=distributed.world_size(),
        calibration={
            "dataset": config.dataset,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
            **extra,
        },
        evaluation={"dense": {}, "pruned": {}},
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _calibration_windows(config: RunConfig, tokenizer, model, device, progress):
    """``(the calibration token ids [nsamples, seqlen] of config, what the self data was or
    None)``; ``--dataset self``: sampled by the dense ``model`` on ``device`` (moved there for
    the generation, back on its own device after), kept on disk."""
    if config.dataset == SELF:
        home = next(model.parameters()).device
        try:
            made = self_windows(
                model.to(device),
                tokenizer,
                config,
                config.seqlen,
                config.seed,
                config.nsamples,
                progress,
            )
        finally:
            model.to(home)
        log.info(
            "calibration: %d windows x %d tokens sampled from the model",
            config.nsamples,
            config.seqlen,
        )
        return made.read(0, config.nsamples), made.describe()
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
    return windows, None


def recover_checkpoint(
    checkpoint: str | Path,
    overrides: dict,
    *,
    command_line: str | None = None,
    progress: bool = True,
) -> PruneResult:
    """``safe-llm recover``: the recover stage (and the evaluation) on a pruned checkpoint,
    through the same stages and run context as a prune run. The teacher is the dense model
    named in its ``recipe.yaml``, whose options are the defaults under ``overrides`` (flag
    names: ``output``, ``recover_steps``...). The checkpoint is written like ``safe-llm
    prune`` writes one, by :func:`finish_run` (atomically), with the recovery in
    ``report.json``, ``recipe.yaml`` and the model card; the checkpoint's perplexities become
    ``evaluation.before_recovery``."""
    start, checkpoint = time.perf_counter(), Path(checkpoint).expanduser()
    distributed.init_from_env()
    output = overrides.get("output")
    if not output:
        raise ConfigError("safe-llm recover needs --output, the directory for the result")
    if Path(output).expanduser().resolve() == checkpoint.resolve():
        raise ConfigError("--output is the input checkpoint; choose another directory")
    recipe, previous = read_checkpoint_record(checkpoint)
    given = {"push_to_hub": False, **overrides, "recover": True, "command_line": command_line}
    config = make_config(recipe, given)  # the pruned run's push is not this one's
    work, fresh = open_work_area(config)
    torch.manual_seed(config.seed)
    device = distributed.local_device(resolve_device(config.device))
    limit = context_length(str(checkpoint), config.trust_remote_code)
    refuse_long_windows(config.recover.seqlen or config.seqlen, limit, "--recover-seqlen")
    model, tokenizer = _load_pruned(checkpoint, previous.get("dtype"), config.trust_remote_code)
    report = RunReport.from_dict(previous)
    report.evaluation["before_recovery"] = report.evaluation.pop("pruned", {})
    if "pruned" in report.zeroshot:
        report.zeroshot["before_recovery"] = report.zeroshot.pop("pruned")
    walk = walk_options(config, device, progress and distributed.is_writer())
    dtype, blocks = next(model.parameters()).dtype, find_blocks(model)[1]
    context = RunContext(
        config,
        device,
        dtype,
        tokenizer,
        None,
        report,
        StagePeaks(device),
        config.pattern(),
        blocks,
        walk,
        work=work,
        fresh=fresh,
        writes=distributed.is_writer(),
    )
    run_stages(model, context, "recover")
    report.stage_peak_memory_bytes = {**report.stage_peak_memory_bytes, **context.peaks.bytes}
    report.recovery = {
        **report.recovery,
        "command": command_line,
        "from_checkpoint": str(checkpoint),
        "total_seconds": time.perf_counter() - start,
    }
    return PruneResult(model, tokenizer, config, report)


def read_checkpoint_record(checkpoint: Path) -> tuple[dict, dict]:
    """``(recipe.yaml, report.json)`` of a checkpoint written by safe-llm."""
    import json

    recipe_file, report_file = checkpoint / "recipe.yaml", checkpoint / "report.json"
    if not recipe_file.is_file() or not report_file.is_file():
        raise ConfigError(
            f"{checkpoint} is not a safe-llm checkpoint (no recipe.yaml / report.json): "
            "recover needs the recipe to know the dense model (the teacher)"
        )
    recipe = load_recipe(recipe_file)
    unknown = unknown_recipe_keys(recipe)
    if unknown:
        raise ConfigError(
            f"{recipe_file} has options this safe-llm does not know ({', '.join(unknown)}): "
            "it was written by an older version; move them into the recipe's sections "
            "(profile:, joint:, recover:; docs/development.md, 'Options and recipes') or prune again"
        )
    return recipe, json.loads(report_file.read_text())


def _load_pruned(checkpoint: Path, dtype: str | None, trust_remote_code: bool):
    """``(model, tokenizer)`` of a pruned checkpoint, in the dtype it was pruned in."""
    from safe_llm.io.models import DTYPES, load_model  # looked up at call time (tests patch it)

    model, tokenizer, _ = load_model(
        str(checkpoint), DTYPES.get(dtype or "", torch.float32), trust_remote_code
    )
    return model, tokenizer


def finish_run(result: PruneResult) -> str | None:
    """The one way a run ends (a prune run or a recovery; the CLI and :func:`prune` alike):
    the writing rank (rank 0,
    or the only process) saves the checkpoint when ``config.output`` is set, the process group
    is released, then the writing rank uploads the checkpoint with ``config.push_to_hub``.
    Returns the Hub commit URL when it pushed, else None."""
    from safe_llm.io.checkpoint import save_checkpoint

    config = result.config
    writes = distributed.is_writer()
    try:
        if writes and config.output:
            save_checkpoint(result)  # replaces the output directory, its work area included
    finally:
        distributed.shutdown()
    if not (writes and config.push_to_hub):
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
    # keywords are flag names: run options (sparsity=0.5), stage options (joint_blocks=2,
    # recover=True, recover_steps=40) and method_options={...}
    call = ", ".join([repr(model), *(f"{k}={v!r}" for k, v in options.items())])
    if method_options:
        call += f", method_options={method_options!r}"
    options.setdefault("command_line", f"safe_llm.prune({call})")
    config = make_config(overrides={"model": model, **options, "method_options": method_options})
    result = run_prune(config, progress=progress)
    finish_run(result)
    return result.model, result.report
