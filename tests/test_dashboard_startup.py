"""The dashboard is up before the services: actions during start-up never crash the program.

The program's ``intake`` service becomes ready only once the test creates a file, so
the whole app stays in start-up, with ``workers`` and ``mailer`` not started yet
(shown STOPPED, with a Start button), for as long as the test needs.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.dashboard_helpers import PATIENCE, Program, http, read_response, run_program
from tests.polling import wait_for, wait_for_line

pytestmark = pytest.mark.subprocess


def post(program: Program, path: str) -> tuple[int, dict[str, object]]:
    status, _, body = http(program.port, "POST", path, token=program.token)
    result: dict[str, object] = json.loads(body)
    return status, result


def test_actions_during_start_up_are_refused_or_wait_and_start_up_holds(tmp_path: Path) -> None:
    ready_file = tmp_path / "intake-ready"
    with run_program(tmp_path, DASHBOARD_APP_READY_FILE=str(ready_file)) as program:
        wait_for(lambda: program.snapshot()["state"] == "starting", what="start-up")
        assert program.service("workers")["state"] == "stopped"
        for action in ("start", "restart"):
            status, body = post(program, f"/api/services/workers/{action}")
            assert status == 409, body
            assert "while the app is starting" in str(body["error"])
        # A restart of every service is kept until start-up is over.
        status, body = post(program, "/api/restart")
        assert status == 202, body
        assert program.service("workers")["state"] == "stopped"
        ready_file.touch()
        wait_for_line(program.stderr_path, "every service started")
        wait_for_line(program.stderr_path, "every service restarted")
        services = {s["name"]: s for s in program.snapshot()["services"]}
        assert {name: s["state"] for name, s in services.items()} == dict.fromkeys(
            ("intake", "workers", "mailer"), "running"
        )
        assert {name: s["restarts"] for name, s in services.items()} == dict.fromkeys(
            ("intake", "workers", "mailer"), 1
        )
        code, _ = program.terminate()
        assert code == 0, program.stderr()
        assert "cannot go from" not in program.stderr()
        assert "Traceback" not in program.stderr()


def test_a_drain_during_start_up_exits_at_once(tmp_path: Path) -> None:
    ready_file = tmp_path / "never"
    with run_program(tmp_path, DASHBOARD_APP_READY_FILE=str(ready_file)) as program:
        wait_for(lambda: program.snapshot()["state"] == "starting", what="start-up")
        status, body = post(program, "/api/drain")
        assert status == 202, body
        # The starting service took no work: its start is called off, not waited out.
        assert program.process.wait(PATIENCE) == 0, program.stderr()
    assert "intake: draining -> stopped" in program.stderr()


def status_for_host(program: Program, host: str) -> int:
    """The status of ``GET /api/snapshot`` (with the token) sent with *host* as its Host."""
    request = (
        f"GET /api/snapshot HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {program.token}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", program.port), timeout=PATIENCE) as sock:
        sock.sendall(request)
        status, _, _ = read_response(sock)
    return status


def test_names_in_nursery_down_allowed_hosts_are_answered_and_others_refused(
    tmp_path: Path,
) -> None:
    allowed = "ops.example.com, Proxy.Example.net:9000"
    with run_program(tmp_path, NURSERY_DOWN_ALLOWED_HOSTS=allowed) as program:
        for host in (
            "ops.example.com",
            f"ops.example.com:{program.port}",
            "proxy.example.net:9000",
        ):
            assert status_for_host(program, host) == 200, host
        for host in ("ops.example.org", f"evil.example:{program.port}"):
            assert status_for_host(program, host) == 421, host
        assert status_for_host(program, program.host) == 200
        code, _ = program.terminate()
        assert code == 0, program.stderr()
