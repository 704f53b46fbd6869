"""The registry of stages: every stage class registered with :func:`register_stage` (its
module ``safe_llm/stages/<stage>/stage.py`` is imported by :func:`registered_stages`).

It imports no stage and not the stage interface (:mod:`safe_llm.stages.base`, which types the
run context with the run config): the config reads the registry to build each stage's section.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from safe_llm.errors import register_unique

STAGES: dict[str, type] = {}


def register_stage(cls: type) -> type:
    """Class decorator: make ``cls`` a stage of every run whose config enables it."""
    return register_unique(STAGES, "stages", cls)


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


def registered_stages() -> list[type]:
    """Every stage, in run order."""
    _load_all()
    return sorted(STAGES.values(), key=lambda cls: (cls.order, cls.name))
