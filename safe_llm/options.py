"""Declaring options: a dataclass field that carries its ``--help`` text, flag metadata, choices
and bounds; the check every options class runs on itself in its ``__post_init__``
(:func:`check_fields`); building an options dataclass from recipe/flag values (unknown names
refused). Imports nothing of torch: the CLI reads these declarations before any model code."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import field

import yaml

from safe_llm.errors import SafeLLMError


class ConfigError(SafeLLMError):
    """An option or recipe that cannot be used; the message says what to change."""


def option(default, help: str, factory=None, **metadata):
    """A dataclass field with ``default`` (or ``default_factory=factory``) and the metadata
    ``{"help": help, **metadata}`` the CLI builds its flag from (``choices``, ``nargs``,
    ``flag`` (the flag's name when it is not ``<prefix><field>``), ``cli=False`` (no flag),
    ``decisive=False`` (does not change the pruned weights)...) and :func:`check_fields`
    checks a value against (``choices``; bounds ``at_least``, ``above``, ``below``,
    ``at_most``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def flag_dest(f: dataclasses.Field, prefix: str = "") -> str:
    """The flat name of field ``f`` in a section with flag ``prefix``: the flag without its
    dashes (``joint_blocks`` for PruneOptions.blocks), also the ``safe_llm.prune`` keyword."""
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


def option_name(options, f: dataclasses.Field) -> str:
    """How the user names field ``f`` of ``options``: its flag (``--joint-blocks``), built from
    the class's ``flag_prefix`` (a stage's ``joint_``, ``recover_``; none for the run's and
    the methods' options) or the field's declared ``flag``."""
    return flag(flag_dest(f, getattr(options, "flag_prefix", "")))


def check_fields(options) -> None:
    """Check every field of the options dataclass ``options`` against its declaration, in
    place: the annotation (:func:`check_type`; an int given for a float becomes a float),
    ``choices``, the bounds ``at_least`` / ``above`` / ``below`` / ``at_most`` (a float must
    also be finite). Every options class calls it first in its ``__post_init__``, so that a
    value from a flag, a recipe or Python is checked once, where it is declared; the first
    bad value raises a :class:`ConfigError` naming the option."""
    for f in dataclasses.fields(options):
        name = option_name(options, f)
        value = check_type(name, getattr(options, f.name), f)
        object.__setattr__(options, f.name, value)  # frozen dataclasses too
        if value is not None:
            _check_declared(name, value, f.metadata)


def _check_declared(name: str, value, declared: typing.Mapping) -> None:
    """``value`` within the ``choices`` and bounds ``declared`` in a field's metadata."""
    choices = declared.get("choices")
    items = value if isinstance(value, list) else [value]
    if choices is not None and any(item not in choices for item in items):
        raise ConfigError(f"{name} takes {', '.join(map(str, choices))}, got {value!r}")
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for key, ok, words in _BOUNDS:
            if key in declared and not ok(item, declared[key]):
                raise ConfigError(f"{name} must be {words} {declared[key]}, got {value!r}")


_BOUNDS = (
    ("at_least", lambda v, b: v >= b, "at least"),
    ("above", lambda v, b: v > b, "above"),
    ("below", lambda v, b: v < b, "below"),
    ("at_most", lambda v, b: v <= b, "at most"),
)


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
    if annotation is typing.Any or isinstance(annotation, typing.TypeVar):
        return value
    origin = typing.get_origin(annotation)
    if origin is list:
        return _check_list(name, value, typing.get_args(annotation)[0])
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"option {name} must be a number, got {value!r}")
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
    """``cls(**values)``: the class checks its values itself (:func:`check_fields` in its
    ``__post_init__``); an unknown name is a :class:`ConfigError` naming ``where`` (e.g.
    ``recipe key joint``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of option: value, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(
            f"{where} has no option(s) {', '.join(sorted(unknown))}; "
            f"its options are: {', '.join(sorted(fields)) or 'none'}"
        )
    return cls(**values)


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes in a size such as ``4GB``, ``500MB``, ``2GiB`` or ``1024``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"{flag} {text!r} is not a size such as 4GB or 500MB")
    unit = (match.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    scale.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})
    return int(float(match.group(1)) * scale[unit])


def parse_count(text, flag: str) -> int:
    """An integer count written with an optional decimal suffix: ``65536``, ``500k``,
    ``2M``, ``1.5G`` (k = 10^3, M = 10^6, G = 10^9; case-insensitive). A sign is kept, so
    the caller's bounds refuse ``-5``; anything else is a :class:`ConfigError` naming
    ``flag``."""
    match = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*([kmg]?)\s*", str(text).lower())
    if not match:
        raise ConfigError(f"{flag} {text!r} is not a count such as 65536, 500k or 2M")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2)]
    return round(float(match.group(1)) * scale)


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


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 numbers: ``2:4`` stays a string (YAML 1.1 reads it as the base-60 int 124)
    and ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    """``text`` read as YAML 1.2 numbers want (:class:`_RecipeLoader`): how every recipe, flag
    value and checkpoint's ``recipe.yaml`` is read. Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_RecipeLoader)
