"""Imports point one way: each folder of the package may import its own layer and the layers
below it, never one above, and no modules import each other in a circle. Imports inside
functions count: a deferred import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safe_llm"

# lowest first; a module's layer is the first prefix it matches
LAYERS = [
    ("safe_llm.errors", "safe_llm.version", "safe_llm.options"),
    ("safe_llm.core",),
    ("safe_llm.io", "safe_llm.evaluation", "safe_llm.inference"),
    ("safe_llm.train",),
    ("safe_llm.methods",),
    # the run config and the run report sit with the stages: the run context the stages share
    # is typed with them (the config reads only the stage registry, the report only core)
    ("safe_llm.stages", "safe_llm.config", "safe_llm.report"),
    ("safe_llm.pipeline", "safe_llm.cli"),
    ("safe_llm", "safe_llm.__main__"),  # the package's face: the Python API and ``python -m``
]
TOP = "safe_llm"  # the package itself matches exactly, not as a prefix of every module


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or (p != TOP and module.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _targets(node: ast.AST, importer: str) -> list[str]:
    """The package modules an import statement loads (``from a import b`` loads ``a.b``
    when that is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom) or node.module is None:
        return []
    assert node.level == 0, f"{importer}: relative import (the package uses absolute ones)"
    base = node.module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports() -> dict[str, set[str]]:
    """``{module: package modules it imports}``, every import statement counted."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = {t for node in ast.walk(tree) for t in _targets(node, name)}
        graph[name] = {t for t in found if t in MODULES and t != name}
    return graph


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from ``start`` back to ``start``, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for target in sorted(graph[module]):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        layer(module)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in imports().items()
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == [], "imports that point up:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    graph = imports()
    cycles = {" -> ".join(c) for m in graph if (c := _cycle_from(m, graph)) is not None}
    assert cycles == set(), "import cycles:\n" + "\n".join(sorted(cycles))


def _stage_of(module: str) -> str | None:
    """``profile`` for ``safe_llm.stages.profile.owl``; None outside a stage's folder (the
    shared ``stages.base`` / ``stages.registry`` included)."""
    parts = module.split(".")
    if parts[:2] == ["safe_llm", "stages"] and len(parts) > 3:
        return parts[2]
    if parts[:2] == ["safe_llm", "stages"] and len(parts) == 3 and module + ".stage" in MODULES:
        return parts[2]  # the stage's package itself
    return None


def test_no_stage_imports_another_stage():
    """Stages import ``stages.base``, ``core`` and the layers below, never each other: what
    two stages share lives in ``core/`` (the block walker, the report types)."""
    sideways = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in sorted(targets)
        if _stage_of(module) and _stage_of(target) and _stage_of(module) != _stage_of(target)
    ]
    assert sideways == [], "stages that reach into other stages:\n" + "\n".join(sideways)


def test_nothing_below_the_pipeline_imports_the_prune_engine_but_its_stage():
    engine = "safe_llm.stages.prune.engine"
    users = {m for m, targets in imports().items() if engine in targets}
    assert {u for u in users if not u.startswith("safe_llm.stages.prune")} == set()


def test_the_layer_check_sees_imports_inside_functions():
    source = "def f():\n    from safe_llm.pipeline import run_prune\n"
    tree = ast.parse(source)
    found = {t for node in ast.walk(tree) for t in _targets(node, "safe_llm.core.blocks")}
    assert found == {"safe_llm.pipeline"}
    assert layer("safe_llm.pipeline") > layer("safe_llm.core.blocks")
