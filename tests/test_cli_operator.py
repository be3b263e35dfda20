"""`nursery-down status|drain|start|restart|escalate|extend-grace` against a running program."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.polling import wait_for, wait_for_line

PROGRAM = Path(__file__).resolve().parent / "programs" / "dashboard_app.py"
TOKEN = "operator-test-token-0123456789"

pytestmark = pytest.mark.subprocess


@contextmanager
def running_program(
    log: Path, *, grace: str = "5", **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The program with its dashboard on a free port (and *grace*, *env*): the process
    and the dashboard's URL once it printed it. Killed at the end if still running."""
    environment = {**os.environ, "NURSERY_DOWN_TOKEN": TOKEN, **env}
    with log.open("wb") as output:
        program = subprocess.Popen(
            [
                *(sys.executable, "-m", "nursery_down", "run", f"{PROGRAM}:sup"),
                *("--dashboard", "127.0.0.1:0", "--grace", grace),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    try:
        match = wait_for_line(log, r"dashboard: (http://127\.0\.0\.1:\d+)/", process=program)
        yield program, match.group(1)
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()


@pytest.fixture(scope="module")
def program_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("operator") / "program.log"
    with running_program(log, DASHBOARD_APP_JOB="0.2,0.5") as (program, url):
        yield url
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=20) in (0, 3)


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


# -- the actions that succeed, each against a program of its own -------------------------

#: Jobs that outlast every test: whatever a drain does to them, it does at its deadline.
LONG_JOBS = {"DASHBOARD_APP_JOB": "60,60", "DASHBOARD_APP_WORKERS": "2"}
#: Every wait on a program of its own has this bound.
PATIENCE = 20.0


def snapshot_of(url: str) -> dict[str, Any]:
    result = cli("status", "--url", url, "--json")
    assert result.returncode == 0, result.stderr
    snapshot: dict[str, Any] = json.loads(result.stdout)
    return snapshot


def service_of(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = next(s for s in snapshot["services"] if s["name"] == name)
    return service


def wait_for_jobs(url: str, *names: str) -> None:
    """Wait until each service in *names* has a job in flight."""
    wait_for(
        lambda: all(service_of(snapshot_of(url), name)["in_flight"] for name in names),
        PATIENCE,
        f"jobs in flight in {', '.join(names)}",
    )


def stop_at_once(program: subprocess.Popen[bytes], url: str) -> int:
    """Escalate the whole app (its long jobs are cut): the program's exit code."""
    result = cli("escalate", "--url", url)
    assert result.returncode == 0, result.stderr
    return program.wait(timeout=PATIENCE)


def test_drain_without_a_service_drains_the_whole_app(tmp_path: Path) -> None:
    log = tmp_path / "program.log"
    with running_program(log, DASHBOARD_APP_JOB="0.2,0.5") as (program, url):
        wait_for_jobs(url, "workers")
        result = cli("drain", "--url", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"shop (pid {program.pid}): draining\n"), result.stdout
        # Every job is short: each finishes within the grace, and the program exits 0.
        assert program.wait(timeout=PATIENCE) == 0, log.read_text()
    output = log.read_text()
    assert re.search(
        r"drain of the whole app by api 127\.0\.0\.1: 3 services, .* exit code 0", output
    )


def test_drain_with_grace_drains_the_whole_app_under_that_grace(tmp_path: Path) -> None:
    log = tmp_path / "program.log"
    with running_program(log, **LONG_JOBS) as (program, url):
        wait_for_jobs(url, "workers", "mailer")
        result = cli("drain", "--grace", "1", "--url", url, "--json")
        assert result.returncode == 0, result.stderr
        snapshot = json.loads(result.stdout)
        assert (snapshot["state"], snapshot["draining"]) == ("draining", True)
        # The program's own grace is 5 s: the deadline is the 1 s asked for.
        assert snapshot["grace_deadline"] <= time.time() + 1.0
        assert program.wait(timeout=PATIENCE) == 3, log.read_text()
    assert re.search(
        r"drain of the whole app by api .* of the 1 s grace, exit code 3", log.read_text()
    )


def test_restart_without_a_service_restarts_every_service(tmp_path: Path) -> None:
    log = tmp_path / "program.log"
    with running_program(log, DASHBOARD_APP_JOB="0.2,0.5") as (program, url):
        wait_for_line(log, "every service started", process=program)
        result = cli("restart", "--url", url)
        assert result.returncode == 0, result.stderr
        wait_for_line(log, "every service restarted", PATIENCE, process=program)
        services = snapshot_of(url)["services"]
        assert {s["name"]: (s["state"], s["restarts"]) for s in services} == dict.fromkeys(
            ("intake", "workers", "mailer"), ("running", 1)
        )
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=PATIENCE) == 0, log.read_text()


def test_escalate_one_service_stops_it_and_counts_its_cut_job(tmp_path: Path) -> None:
    log = tmp_path / "program.log"
    with running_program(log, **LONG_JOBS) as (program, url):
        wait_for_jobs(url, "workers", "mailer")
        result = cli("escalate", "mailer", "--url", url)
        assert result.returncode == 0, result.stderr
        wait_for(
            lambda: service_of(snapshot_of(url), "mailer")["state"] == "stopped",
            PATIENCE,
            "mailer to stop",
        )
        snapshot = snapshot_of(url)
        mailer = service_of(snapshot, "mailer")
        assert (mailer["in_flight"], mailer["hard_cancelled"]) == (0, 1), mailer
        workers = service_of(snapshot, "workers")
        assert (workers["state"], workers["hard_cancelled"]) == ("running", 0), workers
        table = cli("status", "mailer", "--url", url).stdout
        assert re.search(r"^mailer\s+STOPPED\s+0\s+-\s+0\s+0\s+1\s", table, re.MULTILINE), table
        assert stop_at_once(program, url) == 3


def test_extend_grace_moves_a_draining_services_deadline_later(tmp_path: Path) -> None:
    log = tmp_path / "program.log"
    with running_program(log, grace="30", **LONG_JOBS) as (program, url):
        wait_for_jobs(url, "mailer")
        drained = cli("drain", "mailer", "--url", url, "--json")
        assert drained.returncode == 0, drained.stderr
        (job,) = service_of(json.loads(drained.stdout), "mailer")["jobs"]
        before = job["time_left"]
        assert 0 < before <= 30.0, job
        result = cli("extend-grace", "100", "mailer", "--url", url, "--json")
        assert result.returncode == 0, result.stderr
        mailer = service_of(json.loads(result.stdout), "mailer")
        assert mailer["state"] == "draining", mailer
        (job,) = mailer["jobs"]
        # 100 s later, less the few seconds at most between the two answers.
        assert before + 90.0 < job["time_left"] <= before + 100.0, (before, job)
        assert stop_at_once(program, url) == 3
