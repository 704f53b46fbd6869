"""Declaring options: a dataclass field that carries its ``--help`` text and flag metadata,
and building an options dataclass from recipe/flag values (types checked, unknown names
refused). Imports nothing of torch: the CLI reads these declarations before any model code."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import field

from safe_llm.errors import SafeLLMError


class ConfigError(SafeLLMError):
    """An option or recipe that cannot be used; the message says what to change."""


def option(default, help: str, factory=None, **metadata):
    """A dataclass field with ``default`` (or ``default_factory=factory``) and the metadata
    ``{"help": help, **metadata}`` the CLI builds its flag from (``choices``, ``nargs``,
    ``flag`` (the flag's name when it is not ``<prefix><field>``), ``cli=False`` (no flag),
    ``decisive=False`` (does not change the pruned weights)...)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def flag_dest(f: dataclasses.Field, prefix: str = "") -> str:
    """The flat name of field ``f`` in a section with flag ``prefix``: the flag without its
    dashes (``joint_blocks`` for JointOptions.blocks), also the ``safe_llm.prune`` keyword."""
    return f.metadata.get("flag", prefix + f.name)


def flag(dest: str) -> str:
    """``joint_blocks`` -> ``--joint-blocks``."""
    return "--" + dest.replace("_", "-")


def annotation_of(f: dataclasses.Field):
    """Field ``f``'s annotation as a type (dataclass annotations are strings here)."""
    annotation = f.type
    if isinstance(annotation, str):  # ``from __future__ import annotations``
        annotation = eval(annotation, vars(typing), {})
    return annotation


def check_type(name: str, value, f: dataclasses.Field):
    """``value`` if it fits field ``f``'s annotation (ints pass as floats), else ConfigError."""
    annotation = annotation_of(f)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if value is None:
        if optional or f.metadata.get("nullable"):
            return value
        raise ConfigError(f"option {name} needs a value")
    origin = typing.get_origin(annotation)
    if origin is list:
        return _check_list(name, value, typing.get_args(annotation)[0])
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"option {name} must be an integer, got {value!r}")
    if annotation is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # YAML reads ``max_shard_size: 500`` or ``model: 1234`` as numbers
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(
            f"option {name} must be of type {annotation.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _check_list(name: str, value, item: type) -> list:
    """A list of ``item`` (float or str); a single value becomes a list of one."""
    if item is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            return [float(v) for v in value]
        raise ConfigError(f"option {name} must be a list of numbers, got {value!r}")
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"option {name} must be a list of strings, got {value!r}")


def build_options(cls: type, values: dict, where: str):
    """``cls(**values)`` with each value checked against its field; an unknown name or a
    value the dataclass refuses (its ``__post_init__``) is a :class:`ConfigError` naming
    ``where`` (e.g. ``recipe key joint``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of option: value, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(
            f"{where} has no option(s) {', '.join(sorted(unknown))}; "
            f"its options are: {', '.join(sorted(fields)) or 'none'}"
        )
    checked = {n: check_type(n, v, fields[n]) for n, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except SafeLLMError as exc:
        raise ConfigError(str(exc)) from exc


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes in a size such as ``4GB``, ``500MB``, ``2GiB`` or ``1024``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"{flag} {text!r} is not a size such as 4GB or 500MB")
    unit = (match.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    scale.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})
    return int(float(match.group(1)) * scale[unit])


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
