"""The shape of the code the project promises: short functions, a block loop on one screen,
methods that need nothing of the engine."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safe_llm"
LONGEST = 60  # lines, from the def line to the last line of the body (docstring included)


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.relative_to(PACKAGE.parent), node


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in _functions()
        if node.end_lineno - node.lineno + 1 > LONGEST
    ]
    assert long == [], "split these functions:\n" + "\n".join(long)


def test_the_block_loop_reads_on_one_screen():
    (loop,) = [node for path, node in _functions() if node.name == "_run_blocks"]
    assert loop.end_lineno - loop.lineno + 1 <= 40


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_method_interface_and_the_methods_import_nothing_of_the_engine():
    engine = {
        "safe_llm.stages.prune.engine",
        "safe_llm.pipeline",
        "safe_llm.core.activations",
        "safe_llm.stages.profile.owl",
    }
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        assert not _imported_modules(path) & engine, f"{path.name} imports the engine"
