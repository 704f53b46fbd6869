"""Writing a pruned checkpoint that plain ``transformers`` loads, atomically."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from safe_llm.core.atomic import atomic_directory
from safe_llm.errors import SafeLLMError
from safe_llm.io.model_card import render_model_card
from safe_llm.io.work_area import work_dir
from safe_llm.version import __version__

CONFIG_KEY = "safe_llm_sparsity"


class CheckpointError(SafeLLMError):
    """The checkpoint could not be written; the message says what is intact."""


def sparsity_metadata(result) -> dict:
    """What a reader of ``config.json`` needs to know about the pruning."""
    return {
        "tool": f"safe-llm {__version__}",
        "method": result.config.method,
        "structure": result.report.pattern,
        "sparsity": result.report.sparsity,
        "ignore": list(result.config.ignore),
        "overall_sparsity": result.report.overall_sparsity,
        "all_block_weights_sparsity": result.report.all_block_weights_sparsity,
        "unpruned_block_weights": sorted(result.report.unpruned_block_weights),
        **(
            {"sparsity_per_block": result.report.block_sparsity}
            if result.report.sparsity_profile != "uniform"
            else {}
        ),
    }


def recipe_of(result) -> dict:
    """The options of the run, with the sparsity the pattern resolved to (``0.5`` by default).

    The command line is in ``report.json`` and the model card, not here: a recipe holds options.
    """
    options = {
        k: v for k, v in result.config.to_dict().items() if k not in ("command_line", "resume")
    }
    return {**options, "sparsity": result.report.sparsity}


def save_checkpoint(result) -> Path:
    """Write model, tokenizer, ``recipe.yaml``, ``report.json`` and the model card
    ``README.md`` into ``config.output``.

    Everything goes to a temporary sibling directory first and is renamed into place
    (:func:`~safe_llm.core.atomic.atomic_directory`), so a crash never leaves a half-written
    checkpoint (nor the temporary directory, nor parent directories created for it); an
    existing output (``--overwrite``, or a run's work area) is replaced only after the new one
    is complete, and is put back if the final rename fails. A write error (disk full, no
    permission) raises :class:`CheckpointError` saying what is intact.
    """
    output = Path(result.config.output).expanduser()
    try:
        return atomic_directory(output, lambda tmp: _write_files(result, tmp))
    except OSError as exc:
        raise CheckpointError(_write_failure(output, exc)) from exc


def _write_files(result, directory: Path) -> None:
    """Every file of the checkpoint of ``result``, into ``directory``."""
    setattr(result.model.config, CONFIG_KEY, sparsity_metadata(result))
    with _kv_cache_on(result.model.config):
        if getattr(result, "write_weights", None) is not None:  # a streamed model
            result.write_weights(directory, result.config.max_shard_size)
        else:
            result.model.save_pretrained(directory, max_shard_size=result.config.max_shard_size)
    result.tokenizer.save_pretrained(directory)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe_of(result), sort_keys=False))
    report = result.report.to_dict()
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "README.md").write_text(render_model_card(recipe_of(result), report))


@contextmanager
def _kv_cache_on(config) -> Iterator[None]:
    """``config`` with ``use_cache`` on while it is written: the run turned the KV cache off
    for its forward passes (:func:`safe_llm.io.models.load_model`), a checkpoint's users
    generate."""
    if not hasattr(config, "use_cache"):
        yield
        return
    during_run, config.use_cache = config.use_cache, True
    try:
        yield
    finally:
        config.use_cache = during_run


def _write_failure(output: Path, exc: OSError) -> str:
    """What went wrong writing ``output`` and what is still intact."""
    reason = f"{exc.strerror} ({exc.filename})" if exc.strerror and exc.filename else exc
    if (work_dir(output) / "progress.json").is_file():
        intact = (
            f"{output} keeps its previous files and its work area every pruned block: fix "
            "the problem and rerun the same command with --resume to write the checkpoint"
        )
    elif output.exists():
        intact = f"{output} is unchanged"
    else:
        intact = "nothing was written"
    return f"cannot write the checkpoint {output}: {reason}; {intact}"
