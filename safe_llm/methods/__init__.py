"""Pruning methods. Each module in this package registers its methods with ``@register``;
the engine only sees the :class:`~safe_llm.methods.base.PruningMethod` interface."""

from __future__ import annotations

import importlib
import pkgutil

from safe_llm.errors import SafeLLMError, register_unique
from safe_llm.methods.base import PruningMethod

METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``--method cls.name``; a second class of
    the same name is refused (it would silently replace the first)."""
    return register_unique(METHODS, "pruning methods", cls)


def unregister(name: str) -> None:
    """Remove method ``name`` (a method registered by a test)."""
    METHODS.pop(name, None)


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    _load_all()
    return sorted(METHODS)


def get_method_class(name: str) -> type[PruningMethod]:
    _load_all()
    if name not in METHODS:
        raise SafeLLMError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
