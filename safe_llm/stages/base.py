"""The one interface every stage of a run implements, its registry and the run context.

A stage has a ``name``, an ``order`` (the pipeline runs the enabled stages by ascending
order), typed ``Options`` (a dataclass of :func:`~safe_llm.options.option` fields: its
sub-config in :class:`~safe_llm.config.PruneConfig`, recipe key ``section``, CLI flags
``--<flag_prefix><field>``) and ``run(model, context)``, whose returned dict is recorded in
the run report under the stage's name (and in the work area, for ``--resume``).

This module and every stage's declaration module (``stages/<stage>/stage.py``) import
nothing of torch: the CLI builds its flags from them before any model code is loaded; a
stage's ``run`` imports its implementation.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from safe_llm.errors import SafeLLMError

if TYPE_CHECKING:
    from safe_llm.io.work_area import WorkArea


@dataclass
class NoStageOptions:
    """A stage without options of its own."""


class Stage:
    """One step of a run over the whole model.

    Subclasses set ``name``, ``order``, optionally ``Options`` / ``section`` /
    ``flag_prefix`` and implement :meth:`run`. :meth:`enabled` says whether a config runs the
    stage (its options check themselves when built: ``__post_init__``); :meth:`record` puts the result into the report (default: ``report.stages
    [name]``); :meth:`restore` brings the model to the state after the stage when a resumed run
    skips it (default: nothing to do, the stage does not change the weights).
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

    def run(self, model, context: RunContext) -> dict | None:
        """Do the stage's work on ``model`` (in place); return what the report records."""
        raise NotImplementedError

    def record(self, report, result: dict | None) -> None:
        """Record ``result`` (what :meth:`run` returned, or the saved one on a resume)."""
        if result is not None:
            report.stages[self.name] = result

    def restore(self, model, context: RunContext, result: dict | None) -> None:
        """Bring ``model`` to its state after this stage, which finished before a resume."""


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make ``cls`` a stage of every run whose config enables it."""
    if STAGES.get(cls.name, cls) is not cls:
        raise SafeLLMError(
            f"two stages are named {cls.name!r} ({STAGES[cls.name].__module__}."
            f"{STAGES[cls.name].__qualname__} and {cls.__module__}.{cls.__qualname__}); "
            "rename one"
        )
    STAGES[cls.name] = cls
    return cls


def unregister_stage(name: str) -> None:
    """Remove stage ``name`` (a stage registered by a test)."""
    STAGES.pop(name, None)


def _load_all() -> None:
    """Import every ``safe_llm/stages/<stage>/stage.py`` (each registers its stage)."""
    import safe_llm.stages as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            with_stage = importlib.util.find_spec(f"{package.__name__}.{info.name}.stage")
            if with_stage is not None:
                importlib.import_module(f"{package.__name__}.{info.name}.stage")


def registered_stages() -> list[type[Stage]]:
    """Every stage, in run order."""
    _load_all()
    return sorted(STAGES.values(), key=lambda cls: (cls.order, cls.name))


@dataclass
class RunContext:
    """What every stage of one run shares, built once per run.

    ``windows``: the calibration token ids ``[nsamples, seqlen]`` (tokenized once);
    ``work``: the output's work area (None without ``--output``), ``fresh`` False on a resume;
    ``source``: where the engine reads blocks from (None: the model's own); ``results``: what
    each finished stage returned, by name; ``report``: the run report being filled.
    """

    config: Any
    device: Any
    dtype: Any
    tokenizer: Any
    windows: Any
    report: Any
    peaks: Any
    method: Any = None
    work: WorkArea | None = None
    fresh: bool = True
    writer: bool = True  # the rank that writes the work area and the checkpoint
    source: Any = None
    progress: bool = True
    should_stop: Callable[[], int | None] | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def state_dir(self, stage: str) -> Path | None:
        """Stage ``stage``'s own directory in the work area (kept across a resume; a fresh
        run starts without it), or None without a work area. The work area is started (the
        run's options recorded) before a stage saves anything there."""
        if self.work is None:
            return None
        self.start_work_area()
        return self.work.path / stage

    def start_work_area(self) -> None:
        """Record the run's options in the work area, once (the first time state is saved)."""
        if self.work is not None and self.fresh and self.writer and not self.work.started:
            self.work.start(self.config.decisive_options())
