"""A normal (non-editable) install ships the dashboard as nursery_down.dashboard, with its files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.subprocess


def test_the_wheel_maps_dashboard_into_the_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("nursery_down-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "nursery_down/__init__.py",
        "nursery_down/py.typed",
        "nursery_down/dashboard/__init__.py",
        "nursery_down/dashboard/templates/index.html",
        "nursery_down/dashboard/static/app.js",
        "nursery_down/dashboard/static/style.css",
        "nursery_down/queues/_sqlite.py",
        "nursery_down/testing/_plugin.py",
    ):
        assert shipped in names
    top_level = {name.split("/")[0] for name in names}
    assert "dashboard" not in top_level  # no stray top-level module in site-packages
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "nursery-down = nursery_down._cli:main" in text
    assert "nursery_down = nursery_down.testing._plugin" in text
