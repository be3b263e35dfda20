"""`nursery-down`: bad input is one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).parent / "programs"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nursery_down", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_run_a_file_target_exits_0_when_its_work_is_done() -> None:
    result = cli("run", f"{PROGRAMS / 'oneshot.py'}:sup")
    assert result.returncode == 0, result.stderr
    assert "exit code 0" in result.stderr


def test_run_finds_the_only_supervisor_when_attr_is_omitted() -> None:
    result = cli("run", str(PROGRAMS / "oneshot.py"))
    assert result.returncode == 0, result.stderr


def test_run_a_module_target_from_the_current_directory() -> None:
    result = cli("run", "programs.oneshot:sup", cwd=PROGRAMS.parent)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("no/such/file.py:sup", "no such file: no/such/file.py"),
        ("no_such_module_xyz:sup", "cannot import module 'no_such_module_xyz'"),
        (f"{PROGRAMS / 'oneshot.py'}:missing", "has no attribute 'missing'"),
        (f"{PROGRAMS / 'oneshot.py'}:not_a_supervisor", "is a int, not a nursery_down.Supervisor"),
        (":sup", "no module or file in target"),
    ],
)
def test_bad_targets_are_one_line_and_exit_2(target: str, expected: str) -> None:
    assert_one_line_usage_error(cli("run", target), expected)


def test_a_target_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('config missing')\n")
    assert_one_line_usage_error(
        cli("run", f"{broken}:sup"), "cannot import " + str(broken) + ": RuntimeError"
    )


def test_a_bad_service_graph_is_one_line(tmp_path: Path) -> None:
    program = tmp_path / "cycle.py"
    program.write_text(
        "import nursery_down as nd\n"
        "sup = nd.Supervisor('c')\n"
        "async def f(ctx): ...\n"
        "sup.add(f, name='a', after=['b'])\n"
        "sup.add(f, name='b', after=['a'])\n"
    )
    assert_one_line_usage_error(cli("run", f"{program}:sup"), "cycle")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("run",), "the following arguments are required: TARGET"),
        (("run", "x:y", "--grace", "soon"), "expected seconds, got 'soon'"),
        (("run", "x:y", "--grace", "-3"), "expected a finite number of seconds >= 0"),
        *(
            (("run", "x:y", "--upgrade-timeout", bad), "expected a finite number of seconds > 0")
            for bad in ("-1", "0", "soon", "nan", "inf")
        ),
        (("run", "x:y", "--dashboard", "a:1", "--no-dashboard"), "not allowed with argument"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: tuple[str, ...], expected: str) -> None:
    assert_one_line_usage_error(cli(*args), expected)


def test_help_describes_exit_codes() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    assert "3  drained, but some jobs were hard-cancelled" in result.stdout
