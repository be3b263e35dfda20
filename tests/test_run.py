"""The exit codes of a real ``nd.run`` process, and of ``nursery-down run``, when the
program ends by an exception raised inside a service, or drains after a service FAILED.

Each test runs ``tests/programs/ending_app.py`` both ways: as a script that calls
``nd.run(sup)``, and through ``nursery-down run``. Its ``ender`` service says
``ender ready`` on stdout, then ends the way ``ENDING_APP_MODE`` says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import wait_for_line

pytestmark = pytest.mark.subprocess

PROGRAM = Path(__file__).resolve().parent / "programs" / "ending_app.py"
#: Every wait on the program has this bound, so a hang fails instead of stalling.
PATIENCE = 20.0

LAUNCHERS = {
    "nd.run": [sys.executable, str(PROGRAM)],
    "nursery-down run": [sys.executable, "-m", "nursery_down", "run", f"{PROGRAM}:sup"],
}


def environment(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    env.pop("NOTIFY_SOCKET", None)
    env["ENDING_APP_MODE"] = mode
    return env


def run_until_it_ends(launcher: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        LAUNCHERS[launcher],
        env=environment(mode),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("code", [4, 77])
def test_system_exit_with_a_code_raised_by_a_service_exits_with_that_code(
    launcher: str, code: int
) -> None:
    result = run_until_it_ends(launcher, f"system-exit:{code}")
    assert "ender ready" in result.stdout, result.stderr
    assert result.returncode == code, result.stderr
    # What the log says agrees with how the process exits.
    assert f"torn down by SystemExit({code}): exit code {code}" in result.stderr
    assert "exit code 1" not in result.stderr


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_system_exit_0_raised_by_a_service_still_exits_1(launcher: str) -> None:
    result = run_until_it_ends(launcher, "system-exit:0")
    assert "ender ready" in result.stdout, result.stderr
    assert result.returncode == 1, result.stderr


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_keyboard_interrupt_raised_by_a_service_exits_1(launcher: str) -> None:
    result = run_until_it_ends(launcher, "keyboard-interrupt")
    assert "ender ready" in result.stdout, result.stderr
    assert result.returncode == 1, result.stderr


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_drain_after_a_service_failed_exits_1(launcher: str, tmp_path: Path) -> None:
    log = tmp_path / "output"
    with log.open("wb") as output:
        program = subprocess.Popen(
            LAUNCHERS[launcher],
            env=environment("fail"),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(log, r"service ender: running -> failed", process=program)
        wait_for_line(log, r"every service started", process=program)
        program.send_signal(signal.SIGTERM)
        # The drain itself is clean: store has no job. The FAILED service decides.
        assert program.wait(timeout=PATIENCE) == 1, log.read_text()
        assert "drain of store by signal SIGTERM: 0 jobs" in log.read_text()
    finally:
        if program.poll() is None:
            program.kill()
            program.wait(PATIENCE)
