"""The one interface every stage of a run implements and the typed run context (the registry
is :mod:`safe_llm.stages.registry`, re-exported here).

A stage has a ``name``, an ``order`` (the pipeline runs the enabled stages by ascending
order), typed ``Options`` (a dataclass of :func:`~safe_llm.options.option` fields: its
sub-config in :class:`~safe_llm.config.RunConfig`, recipe key ``section``, CLI flags
``--<flag_prefix><field>``) and ``run(model, context)``, whose result is recorded in the run
report (and, as a JSON document, in the work area, for ``--resume``).

Stages import this module, :mod:`safe_llm.core` and the layers below, never each other
(``tests/test_import_layers.py``): what two stages share lives in ``core/``.

This module and every stage's declaration module (``stages/<stage>/stage.py``) import
nothing of torch: the CLI builds its flags from them before any model code is loaded; a
stage's ``run`` imports its implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from safe_llm.stages.registry import register_stage, registered_stages, unregister_stage

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from safe_llm.config import RunConfig
    from safe_llm.core.memory import StagePeaks
    from safe_llm.core.sparsity import SparsityPattern
    from safe_llm.core.walker import BlockSource, WalkOptions
    from safe_llm.io.work_area import WorkArea
    from safe_llm.methods.base import PruningMethod
    from safe_llm.report import RunReport

__all__ = [
    "NoStageOptions",
    "RunContext",
    "Stage",
    "register_stage",
    "registered_stages",
    "unregister_stage",
]


@dataclass
class NoStageOptions:
    """A stage without options of its own."""


class Stage:
    """One step of a run over the whole model.

    Subclasses set ``name``, ``order``, optionally ``Options`` / ``section`` /
    ``flag_prefix`` and implement :meth:`run`. :meth:`enabled` says whether a config runs the
    stage (its options check themselves when built: ``__post_init__``); :meth:`record` puts
    the result into the report (default: ``report.stages[name]``); :meth:`document` and
    :meth:`from_document` turn a result into the JSON document the work area keeps and back
    (default: the result is one); :meth:`restore` brings the model to the state after the
    stage when a resumed run skips it (default: nothing to do, the stage does not change the
    weights).
    """

    name: ClassVar[str]
    order: ClassVar[int]
    Options: ClassVar[type] = NoStageOptions
    section: ClassVar[str | None] = None  # recipe key of the options; default: the name
    flag_prefix: ClassVar[str | None] = None  # default: "<name>_"
    commands: ClassVar[tuple[str, ...]] = ("prune",)  # the subcommands that run it

    @classmethod
    def recipe_key(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def prefix(cls) -> str:
        """The flags' prefix: the stage's ``flag_prefix``, else its options' (which name
        themselves in their errors with it), else ``<name>_``."""
        if cls.flag_prefix is not None:
            return cls.flag_prefix
        return getattr(cls.Options, "flag_prefix", cls.name + "_")

    @classmethod
    def enabled(cls, config) -> bool:
        """Whether ``config`` runs this stage (default: always)."""
        return True

    def run(self, model, context: RunContext) -> Any:
        """Do the stage's work on ``model`` (in place); return what the report records."""
        raise NotImplementedError

    def document(self, result: Any) -> dict | None:
        """``result`` as the JSON document the work area keeps."""
        return result

    def from_document(self, document: dict | None) -> Any:
        """The result a finished stage's saved ``document`` stands for (on a resume)."""
        return document

    def record(self, report, result: dict | None) -> None:
        """Record ``result`` (what :meth:`run` returned, or the saved one on a resume)."""
        if result is not None:
            report.stages[self.name] = result

    def restore(self, model, context: RunContext, result: dict | None) -> None:
        """Bring ``model`` to its state after this stage, which finished before a resume."""


@dataclass
class RunContext:
    """What every stage of one run shares, resolved once per run from the run config.

    ``pattern``: the run's sparsity pattern (parsed once); ``blocks``: the model's decoder
    blocks (found once); ``walk``: how the blocks are walked (device, batch size, ignored
    layers, activation budget); ``method``: the pruning method (None in ``safe-llm
    recover``); ``windows``: the calibration token ids ``[nsamples, seqlen]`` (tokenized once;
    None in ``safe-llm recover``); ``work``: the output's work area (None without
    ``--output``), ``fresh`` False on a resume; ``writes``: whether this process is the rank
    that writes the work area and the checkpoint; ``source``: where the engine reads blocks
    from (None: the model's own); ``results``: what each finished stage returned, by name;
    ``report``: the run report being filled.
    """

    config: RunConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer: PreTrainedTokenizerBase
    windows: torch.Tensor | None
    report: RunReport
    peaks: StagePeaks
    pattern: SparsityPattern
    blocks: nn.ModuleList
    walk: WalkOptions
    method: PruningMethod | None = None
    work: WorkArea | None = None
    fresh: bool = True
    writes: bool = True
    source: BlockSource | None = None
    should_stop: Callable[[], int | None] | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return self.walk.progress

    @property
    def blocks_to_prune(self) -> int:
        """The blocks the run prunes: all, or the first ``--max-blocks``."""
        limit = self.config.max_blocks
        return len(self.blocks) if limit is None else min(limit, len(self.blocks))

    def state_dir(self, stage: str) -> Path | None:
        """Stage ``stage``'s own directory in the work area (kept across a resume; a fresh
        run starts without it), or None without a work area. The work area is started (the
        run's options recorded) before a stage saves anything there."""
        if self.work is None:
            return None
        self.start_work_area()
        return self.work.path / stage

    def saved_state_dir(self, stage: str) -> Path | None:
        """Where :meth:`state_dir` is, only if a run saved state there before (nothing is
        started: a run refused early leaves no work area)."""
        if self.work is None or not (self.work.path / stage).is_dir():
            return None
        return self.work.path / stage

    def start_work_area(self) -> None:
        """Record the run's options in the work area, once (the first time state is saved)."""
        if self.work is not None and self.fresh and self.writes and not self.work.started:
            self.work.start(self.config.decisive_options())
