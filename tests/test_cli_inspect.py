"""`nursery-down tasks` against a running program, and the drain report `run` prints at exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import wait_for_line

PROGRAM = Path(__file__).resolve().parent / "programs" / "stuck_app.py"
TOKEN = "inspect-cli-token-0123456789"

pytestmark = pytest.mark.subprocess


def start(tmp_path: Path, grace: str) -> tuple[subprocess.Popen[bytes], Path, str]:
    log = tmp_path / "program.log"
    env = {**os.environ, "NURSERY_DOWN_TOKEN": TOKEN, "STUCK_APP_GRACE": grace}
    with log.open("wb") as output:
        program = subprocess.Popen(
            [
                *(sys.executable, "-m", "nursery_down", "run", f"{PROGRAM}:sup"),
                *("--dashboard", "127.0.0.1:0"),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    match = wait_for_line(log, r"dashboard: (http://127\.0\.0\.1:\d+)/", process=program)
    wait_for_line(log, r"app depot: every service started", process=program)
    return program, log, match.group(1)


def test_tasks_prints_where_the_stuck_job_waits(tmp_path: Path) -> None:
    program, _, url = start(tmp_path, "1")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
        result = subprocess.run(
            [sys.executable, "-m", "nursery_down", "tasks", "--url", url, "--token", TOKEN],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        refused = subprocess.run(
            [sys.executable, "-m", "nursery_down", "tasks", "--url", url, "--token", "wrong"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    finally:
        program.send_signal(signal.SIGTERM)  # the stuck job is cut at the 1 s grace
        program.wait(timeout=20)
    assert result.returncode == 0, result.stderr
    assert "task service loader" in result.stdout
    assert f"wait_for_the_database at {PROGRAM}:" in result.stdout
    assert refused.returncode == 2
    assert "the token was refused" in refused.stderr


def test_run_prints_the_whole_app_drain_report_at_exit(tmp_path: Path) -> None:
    program, log, _ = start(tmp_path, "1")
    try:
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=20) == 3
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
    text = log.read_text()
    report = text[text.index("nursery-down: drain of the whole app") :].splitlines()
    # The real clock: the 1 s grace, and a few milliseconds of scheduling.
    assert re.fullmatch(
        r"nursery-down: drain of the whole app by signal SIGTERM: 1 service, 2 jobs, "
        r"1 finished, 1 cut, in 1\.[01] s of the 1 s grace, exit code 3",
        report[0],
    )
    assert re.match(
        r"  drain of loader by signal SIGTERM: 2 jobs, 1 finished within 0\.\d s, ", report[1]
    )
    assert report[1].endswith("1 cut at the 1 s grace (stuck-1), hard-cancelled")
    assert re.fullmatch(r"    held longest by stuck-1: hard-cancelled after 1\.[01] s", report[2])
