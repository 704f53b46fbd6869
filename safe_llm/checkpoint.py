"""Writing a pruned checkpoint that plain ``transformers`` loads, atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from safe_llm import __version__
from safe_llm.errors import SafeLLMError
from safe_llm.model_card import render_model_card
from safe_llm.resume import work_dir

CONFIG_KEY = "safe_llm_sparsity"


class CheckpointError(SafeLLMError):
    """The checkpoint could not be written; the message says what is intact."""


def sparsity_metadata(result) -> dict:
    """What a reader of ``config.json`` needs to know about the pruning."""
    return {
        "tool": f"safe-llm {__version__}",
        "method": result.config.method,
        "structure": result.report["pattern"],
        "sparsity": result.report["sparsity"],
        "ignore": list(result.config.ignore),
        "overall_sparsity": result.report["overall_sparsity"],
        **(
            {"sparsity_per_block": result.report["block_sparsity"]}
            if result.report.get("sparsity_profile", "uniform") != "uniform"
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
    return {**options, "sparsity": result.report["sparsity"]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _missing_ancestors(path: Path) -> list[Path]:
    """``path``'s ancestors that do not exist yet, outermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def save_checkpoint(result) -> Path:
    """Write model, tokenizer, ``recipe.yaml``, ``report.json`` and the model card
    ``README.md`` into ``config.output``.

    Everything goes to a temporary sibling directory first and is renamed into place, so a
    crash never leaves a half-written checkpoint (nor the temporary directory, nor parent
    directories created for it); an existing output (``--overwrite``, or a run's work area)
    is replaced only after the new one is complete, and is put back if the final rename
    fails. A write error (disk full, no permission) raises :class:`CheckpointError` saying
    what is intact.
    """
    output = Path(result.config.output).expanduser()
    created = _missing_ancestors(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as exc:
        _remove_dirs(created)
        raise CheckpointError(_write_failure(output, exc)) from exc
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
        setattr(result.model.config, CONFIG_KEY, sparsity_metadata(result))
        if getattr(result, "write_weights", None) is not None:  # a streamed model
            result.write_weights(tmp, result.config.max_shard_size)
        else:
            result.model.save_pretrained(tmp, max_shard_size=result.config.max_shard_size)
        result.tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe_of(result), sort_keys=False))
        (tmp / "report.json").write_text(json.dumps(result.report, indent=2))
        (tmp / "README.md").write_text(render_model_card(recipe_of(result), result.report))
        if output.exists():
            # rename(2) replaces an empty directory atomically: park the old checkpoint there
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(old)
            try:
                tmp.rename(output)
            except BaseException:
                old.rename(output)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(exc, OSError):
            raise CheckpointError(_write_failure(output, exc)) from exc
        raise
    return output


def _remove_dirs(created: list[Path]) -> None:
    """Remove the (empty) directories ``created`` for the checkpoint, innermost first."""
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


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
