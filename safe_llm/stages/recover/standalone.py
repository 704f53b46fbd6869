"""``safe-llm recover CHECKPOINT``: recovery of a pruned checkpoint already written, into a
new checkpoint with its report, recipe and model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from safe_llm.core import distributed
from safe_llm.core.memory import StagePeaks
from safe_llm.stages.recover.options import RecoveryError
from safe_llm.stages.recover.stage import run_recovery


def _load_pruned(checkpoint: Path, dtype: str | None, trust_remote_code: bool):
    """``(model, tokenizer)`` of a pruned checkpoint, in the dtype it was pruned in."""
    from safe_llm.io.models import DTYPES, load_model

    model, tokenizer, _ = load_model(
        str(checkpoint), DTYPES.get(dtype or "", torch.float32), trust_remote_code
    )
    return model, tokenizer


def _evaluation_after_recovery(model, tokenizer, config, device, previous: dict, progress) -> dict:
    """The checkpoint's evaluation with its pruned scores kept as ``before_recovery`` and,
    with ``config.eval``, the recovered model's as ``pruned``."""
    from safe_llm.pipeline import evaluate_sources

    evaluation = dict(previous.get("evaluation") or {})
    evaluation["before_recovery"] = evaluation.pop("pruned", {})
    if config.eval:
        model.to(device)
        evaluation["pruned"] = evaluate_sources(model, tokenizer, config, device, progress)
        model.to("cpu")
    return evaluation


def _read_checkpoint_record(checkpoint: Path) -> tuple[dict, dict]:
    """``(recipe.yaml, report.json)`` of a checkpoint written by safe-llm."""
    import yaml

    recipe_file, report_file = checkpoint / "recipe.yaml", checkpoint / "report.json"
    if not recipe_file.is_file() or not report_file.is_file():
        raise RecoveryError(
            f"{checkpoint} is not a safe-llm checkpoint (no recipe.yaml / report.json): "
            "recover needs the recipe to know the dense model (the teacher)"
        )
    return yaml.safe_load(recipe_file.read_text()) or {}, json.loads(report_file.read_text())


def _with_peaks(report, peaks: StagePeaks):
    """``report`` with ``peaks``' stages added to its per-stage peak memory."""
    report.stage_peak_memory_bytes = {**(report.stage_peak_memory_bytes or {}), **peaks.bytes}
    return report


def _recovery_state_dir(output: str, resume: bool) -> Path:
    """The recovery state's directory in ``output``'s work area, emptied unless resuming
    (by the writing rank, before any rank reads it)."""
    from safe_llm.io.work_area import work_dir

    state_dir = work_dir(output) / "recovery"
    if not resume and state_dir.exists() and distributed.is_writer():
        shutil.rmtree(state_dir)
    distributed.barrier()
    return state_dir


def recover_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    options: dict,
    *,
    overwrite: bool = False,
    resume: bool = False,
    device: str | None = None,
    evaluate: list[str] | None = None,
    eval_max_windows: int | None = None,
    command_line: str | None = None,
    progress: bool = True,
):
    """Recover an existing pruned checkpoint into ``output``: the teacher is the dense model
    named in its ``recipe.yaml``; ``options`` are recovery settings (``recover_options``) on
    top of the recipe's. The checkpoint is written like ``safe-llm prune`` writes one
    (atomically), with the recovery in ``report.json``, ``recipe.yaml`` and the model card.
    Returns the :class:`~safe_llm.pipeline.PruneResult` it wrote."""
    from safe_llm.config import make_config
    from safe_llm.io.checkpoint import save_checkpoint
    from safe_llm.io.models import resolve_device
    from safe_llm.pipeline import PruneResult
    from safe_llm.report import RunReport  # (imported here: they import this module)

    start, checkpoint = time.perf_counter(), Path(checkpoint).expanduser()
    distributed.init_from_env()
    if Path(output).expanduser().resolve() == checkpoint.resolve():
        raise RecoveryError("--output is the input checkpoint; choose another directory")
    recipe, previous = _read_checkpoint_record(checkpoint)
    overrides = {
        "output": str(output),
        "overwrite": overwrite,
        "resume": resume,
        "recover": "distill",
        "recover_options": options,
        "command_line": command_line,
        "device": device,
        "eval": evaluate,
        "eval_max_windows": eval_max_windows,
    }
    config = make_config(recipe, {k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(config.seed)
    target = distributed.local_device(resolve_device(config.device))
    model, tokenizer = _load_pruned(checkpoint, previous.get("dtype"), config.trust_remote_code)
    state_dir = _recovery_state_dir(config.output, resume)
    progress = progress and distributed.is_writer()
    peaks = StagePeaks(target)
    with peaks.stage("recovery"):
        recovery = run_recovery(model, tokenizer, config, target, state_dir=state_dir,
                                progress=progress)  # fmt: skip
    report = _with_peaks(RunReport.from_dict(previous), peaks)
    report.evaluation = _evaluation_after_recovery(
        model, tokenizer, config, target, previous, progress
    )
    recovery.update(command=command_line, from_checkpoint=str(checkpoint))
    report.recovery = {**recovery, "total_seconds": time.perf_counter() - start}
    result = PruneResult(model, tokenizer, config, report)
    if distributed.is_writer():  # under torchrun rank 0 alone writes
        save_checkpoint(result)  # replaces the output directory, its work area included
    return result
