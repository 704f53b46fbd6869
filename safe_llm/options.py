"""Declaring options: a dataclass field that carries its ``--help`` text and flag metadata."""

from __future__ import annotations

from dataclasses import field


def option(default, help: str, factory=None, **metadata):
    """A dataclass field with ``default`` (or ``default_factory=factory``) and the metadata
    ``{"help": help, **metadata}`` the CLI builds its flag from (``choices``, ``nargs``...)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})
