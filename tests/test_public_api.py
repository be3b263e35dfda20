"""The public API is exactly what __all__ says, and nothing private leaks."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

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


def test_dashboard_ships_as_a_subpackage() -> None:
    dashboard = importlib.import_module("nursery_down.dashboard")
    assert dashboard.__file__ is not None
    assert dashboard.__name__ == "nursery_down.dashboard"
