"""`nursery-down status|drain|start|restart|escalate|extend-grace` against a running program."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import wait_for, wait_for_line

PROGRAM = Path(__file__).resolve().parent / "programs" / "dashboard_app.py"
TOKEN = "operator-test-token-0123456789"

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def program_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("operator") / "program.log"
    env = {**os.environ, "NURSERY_DOWN_TOKEN": TOKEN, "DASHBOARD_APP_JOB": "0.2,0.5"}
    with log.open("wb") as output:
        program = subprocess.Popen(
            [
                *(sys.executable, "-m", "nursery_down", "run", f"{PROGRAM}:sup"),
                *("--dashboard", "127.0.0.1:0", "--grace", "5"),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        match = wait_for_line(log, r"dashboard: (http://127\.0\.0\.1:\d+)/", process=program)
        yield match.group(1)
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=20) in (0, 3)
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()


def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    if token is not None:
        env["NURSERY_DOWN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "nursery_down", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_status_prints_a_table_of_services(program_url: str) -> None:
    result = cli("status", "--url", program_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("shop (pid ")
    assert lines[1].split()[:3] == ["SERVICE", "STATE", "IN-FLIGHT"]
    assert {line.split()[0] for line in lines[2:]} == {"intake", "workers", "mailer"}


def test_status_json_is_the_snapshot(program_url: str) -> None:
    result = cli("status", "--url", program_url, "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["app"] == "shop"
    assert [s["name"] for s in snapshot["services"]] == ["intake", "workers", "mailer"]


def test_drain_then_start_one_service(program_url: str) -> None:
    drained = cli("drain", "mailer", "--url", program_url, "--json")
    assert drained.returncode == 0, drained.stderr
    state = {s["name"]: s["state"] for s in json.loads(drained.stdout)["services"]}
    assert state["mailer"] in ("draining", "stopped")
    assert state["workers"] == "running"
    wait_for(
        lambda: "STOPPED" in cli("status", "mailer", "--url", program_url).stdout,
        what="`status mailer` to say STOPPED",
    )
    started = cli("start", "mailer", "--url", program_url)
    assert started.returncode == 0, started.stderr
    assert re.search(r"^mailer\s+(STARTING|RUNNING)", started.stdout, re.MULTILINE)


def test_restart_and_extend_grace(program_url: str) -> None:
    assert cli("restart", "workers", "--url", program_url).returncode == 0
    refused = cli("extend-grace", "10", "intake", "--url", program_url)
    assert refused.returncode == 2
    assert "not draining" in refused.stderr


def test_the_token_can_come_from_a_pasted_dashboard_url(program_url: str) -> None:
    result = cli("status", "--url", f"{program_url}/?token={TOKEN}", token=None)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "token", "expected"),
    [
        (("status",), "wrong-token", "the token was refused (wrong token)"),
        (("status",), None, "the token was refused (pass --token or set NURSERY_DOWN_TOKEN)"),
        (("drain", "nope"), TOKEN, "unknown service 'nope'"),
        (("status", "nope"), TOKEN, "unknown service 'nope'"),
    ],
)
def test_refusals_are_one_line_and_exit_2(
    program_url: str, args: tuple[str, ...], token: str | None, expected: str
) -> None:
    result = cli(*args, "--url", program_url, token=token)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr


def test_a_wrong_url_is_one_line_and_exit_2() -> None:
    result = cli("status", "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "cannot reach http://127.0.0.1:9" in result.stderr
    bad = cli("status", "--url", "ftp://example")
    assert bad.returncode == 2
    assert "not an http(s) URL" in bad.stderr
