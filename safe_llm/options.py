"""Declaring options: a dataclass field that carries its ``--help`` text and flag metadata."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field


def option(default, help: str, factory=None, **metadata):
    """A dataclass field with ``default`` (or ``default_factory=factory``) and the metadata
    ``{"help": help, **metadata}`` the CLI builds its flag from (``choices``, ``nargs``...)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def parse_list(values: str | Iterable[str] | None) -> list[str]:
    """``"a,b"`` / ``["a", "b,c"]`` -> ``["a", "b", "c"]``: comma- and space-separated lists.

    Empty items are dropped and duplicates kept once, in first-seen order.
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    items = (item.strip() for value in values for item in value.replace(",", " ").split())
    return list(dict.fromkeys(item for item in items if item))
