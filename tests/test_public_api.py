"""The public API is exactly what __all__ says, and nothing private leaks."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
import subprocess
import sys
from pathlib import Path

import nursery_down as nd


def test_exports_match_all() -> None:
    public = {name for name in dir(nd) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(nd, name)).__name__ == "module"}
    assert public - modules == set(nd.__all__)
    for name in nd.__all__:
        value = getattr(nd, name)
        if isinstance(value, type) or inspect.isfunction(value):
            assert value.__module__.startswith("nursery_down"), name


def test_every_error_derives_from_nursery_down_error() -> None:
    for name in nd.__all__:
        value = getattr(nd, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, nd.NurseryDownError)


def test_the_core_imports_no_web_stack() -> None:
    code = (
        "import sys, nursery_down; "
        "print(sorted(m for m in ('quart', 'hypercorn', 'quart_trio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_core_needs_nothing_that_trio_does_not_bring() -> None:
    def names(distribution: str) -> set[str]:
        requirements = importlib.metadata.requires(distribution) or []
        core = (r for r in requirements if "extra ==" not in r)
        return {re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower() for r in core}

    core = names("nursery-down")
    assert core == {"trio", "outcome"}
    assert core - {"trio"} <= names("trio")


def test_dashboard_ships_as_a_subpackage() -> None:
    dashboard = importlib.import_module("nursery_down.dashboard")
    assert dashboard.__file__ is not None
    assert dashboard.__name__ == "nursery_down.dashboard"


def test_the_core_modules_import_one_way() -> None:
    # Every import among the private core modules, type-checking ones included, must
    # point one way: a cycle means two modules reach into each other.
    root = Path(nd.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("_*.py"):
        module = path.stem
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                imported.add(node.module.split(".")[0])
        graph[module] = {name for name in imported if name.startswith("_") and name != module}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for imported in graph.get(module, ()):
                if imported == start:
                    return [*path, start]
                if imported not in path:
                    stack.append((imported, [*path, imported]))
        return None

    cycles = [cycle for module in graph if (cycle := cycle_from(module))]
    assert cycles == []
