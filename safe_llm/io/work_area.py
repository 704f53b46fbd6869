"""Resumable runs: the engine's state after each finished block, kept in a work area.

The work area is ``<output>/.safe_llm_work/``::

    config.json                the options that decide the result (compared on --resume)
    stages.json                the finished stages and what each returned (skipped on --resume)
    <stage>/                   a stage's own state (e.g. recover/: recovery's training state)
    block_00003.safetensors    block 3's state dict after pruning
    stream_00004.safetensors   what feeds block 4: ``hidden`` [n, seq, d], ``dense`` [n, seq, d]
                               (with dense targets) and the RNG state
    progress.json              the commit record: finished blocks, their reports, the stream file

Every file is written under a temporary name, fsynced and renamed into place (``os.replace``);
``progress.json`` is replaced only after the files it names are complete. A kill at any moment
therefore leaves the state of the last finished block. The final checkpoint replaces the whole
output directory (work area included) in one rename, only once it is complete.

A later streaming or data-parallel engine needs only :class:`EngineState` and the three
:class:`WorkArea` calls ``save``, ``load`` and ``check_config``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safe_llm.core.atomic import atomic_write
from safe_llm.errors import SafeLLMError

log = logging.getLogger(__name__)

WORK_DIR = ".safe_llm_work"
FORMAT_VERSION = 2  # 2: the options tree (nested sub-configs) and stage records


class ResumeError(SafeLLMError):
    """A work area that cannot be resumed (different options, missing or damaged files)."""


class WorkAreaError(SafeLLMError):
    """The work area could not be written; the message says what is still intact."""


@dataclass
class EngineState:
    """Everything the engine needs to continue with block ``next_block``.

    ``hidden``: the pruned stream feeding block ``next_block`` ``[n, seq, d]``;
    ``dense_stream``: the dense stream ``[n, seq, d]`` (dense targets only, else None);
    ``reports``: the finished blocks' reports (``BlockReport`` as dicts);
    ``rng``: the global RNG states after the last finished block (see :func:`rng_state`).
    """

    next_block: int
    hidden: torch.Tensor
    dense_stream: torch.Tensor | None = None
    reports: list[dict] = field(default_factory=list)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after saving block ``finished - 1``."""

    def __init__(self, signum: int, finished: int, total: int, work_dir: Path | None):
        super().__init__(f"interrupted by signal {signum} after {finished}/{total} blocks")
        self.signum, self.finished, self.total, self.work_dir = signum, finished, total, work_dir


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU and every CUDA device's global RNG state, as uint8 tensors."""
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{index}"] = state
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "rng.cpu" in states:
        torch.set_rng_state(states["rng.cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def work_dir(output: str | os.PathLike) -> Path:
    """The work area of a run writing its checkpoint to ``output``."""
    return Path(output).expanduser() / WORK_DIR


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every option that differs, sorted by key (``saved``
    and ``current``: the decisive options, e.g. ``RunConfig.decisive_options()``)."""
    keys = sorted(set(saved) | set(current))
    missing = "(unset)"
    return [
        f"{k}: {saved.get(k, missing)!r} -> {current.get(k, missing)!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def _write_json(path: Path, value: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares memory with nothing (safetensors refuses aliases)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


class WorkArea:
    """The saved state of one run in ``path`` (normally ``<output>/.safe_llm_work``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.started = False  # this process recorded the run's options (start)

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    def block_file(self, index: int) -> Path:
        """Where block ``index``'s pruned state dict is saved."""
        return self.path / f"block_{index:05d}.safetensors"

    def exists(self) -> bool:
        return self.progress_file.is_file() or (self.path / "config.json").is_file()

    def progress(self) -> dict:
        """The commit record; ``{"finished_blocks": 0, ...}`` when no block is saved yet."""
        if not self.progress_file.is_file():
            return {"finished_blocks": 0, "reports": []}
        try:
            return json.loads(self.progress_file.read_text())
        except (OSError, ValueError) as exc:
            raise ResumeError(f"work area {self.path} is damaged ({exc}); use --overwrite") from exc

    def finished_blocks(self) -> int:
        return int(self.progress()["finished_blocks"])

    def saved_config(self) -> dict | None:
        path = self.path / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def check_config(self, config: dict) -> None:
        """Raise :class:`ResumeError` naming every option of ``config`` (the decisive
        options) that differs from the saved run's."""
        document = self.saved_config()
        if document is None:
            return
        if document.get("version") != FORMAT_VERSION:
            raise ResumeError(
                f"cannot resume the run in {self.path}: an older safe-llm wrote it; pass "
                "--overwrite instead of --resume to start over"
            )
        saved = document["options"]
        differences = config_differences(saved, config)
        if differences:
            raise ResumeError(
                f"cannot resume the run in {self.path}: it used different options "
                f"({'; '.join(differences)}); rerun with the same options, or pass --overwrite "
                "instead of --resume to start over"
            )

    def start(self, config: dict) -> None:
        """Begin a fresh run: drop any earlier state and record ``config`` (the options that
        decide the result, compared on a resume)."""
        self.remove()
        self.started = True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json(self.path / "config.json", {"version": FORMAT_VERSION, "options": config})
        except OSError as exc:
            raise WorkAreaError(
                f"cannot create the work area {self.path}: {exc.strerror or exc}; "
                "nothing of this run was saved"
            ) from exc

    def save(self, state: EngineState, blocks: dict[int, nn.Module], total_blocks: int) -> None:
        """Record the blocks ``blocks`` (``{index: pruned block}``, those finished since the
        last save, up to ``state.next_block - 1``) as finished."""
        index = state.next_block - 1
        previous = self.progress()
        stream = {"hidden": _host_copy(state.hidden), **state.rng}
        if state.dense_stream is not None:
            stream["dense"] = _host_copy(state.dense_stream)
        try:
            for block_index, block in blocks.items():
                weights = {name: _host_copy(t) for name, t in block.state_dict().items()}
                _write_tensors(self.block_file(block_index), weights)
            stream_name = f"stream_{state.next_block:05d}.safetensors"
            _write_tensors(self.path / stream_name, stream)
            _write_json(
                self.progress_file,
                {
                    "version": FORMAT_VERSION,
                    "finished_blocks": state.next_block,
                    "total_blocks": total_blocks,
                    "stream": stream_name,
                    "reports": state.reports,
                },
            )
        except OSError as exc:
            kept = previous["finished_blocks"]
            raise WorkAreaError(
                f"cannot save block {index} in the work area {self.path}: {exc.strerror or exc}; "
                f"the work area still holds the {kept} finished block(s) before it intact"
            ) from exc
        old_stream = previous.get("stream")
        if old_stream and old_stream != stream_name:
            with contextlib.suppress(OSError):
                (self.path / old_stream).unlink()

    def load(self, blocks: nn.ModuleList | None) -> EngineState | None:
        """Put the saved pruned weights into ``blocks`` and return the state to continue from
        (``None`` when no block was finished). With ``blocks=None`` (a streamed run, whose
        finished blocks stay in the work area) only the state is read."""
        progress = self.progress()
        finished = int(progress["finished_blocks"])
        if finished == 0:
            return None
        if blocks is not None and finished > len(blocks):
            raise ResumeError(
                f"work area {self.path} has {finished} blocks but the model has {len(blocks)}"
            )
        try:
            for index in range(finished if blocks is not None else 0):
                state = load_file(str(self.block_file(index)))
                blocks[index].load_state_dict(state, strict=True)
            stream = load_file(str(self.path / progress["stream"]))
        except (OSError, RuntimeError, KeyError) as exc:
            raise ResumeError(
                f"work area {self.path} is damaged ({exc}); use --overwrite to start over"
            ) from exc
        return EngineState(
            next_block=finished,
            hidden=stream.pop("hidden"),
            dense_stream=stream.pop("dense", None),
            reports=progress["reports"],
            rng={k: v for k, v in stream.items() if k.startswith("rng.")},
        )

    def finished_stages(self) -> dict[str, dict | None]:
        """``{stage name: what it returned}`` of every stage that finished, in order."""
        path = self.path / "stages.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ResumeError(f"work area {self.path} is damaged ({exc}); use --overwrite") from exc

    def finish_stage(self, name: str, result: dict | None) -> None:
        """Record stage ``name`` as finished with ``result`` (a JSON document)."""
        finished = {**self.finished_stages(), name: result}
        try:
            _write_json(self.path / "stages.json", finished)
        except OSError as exc:
            raise WorkAreaError(
                f"cannot record stage {name} in the work area {self.path}: "
                f"{exc.strerror or exc}; the stages before it stay recorded"
            ) from exc

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
