"""The dashboard of a real ``nursery-down run ... --dashboard 127.0.0.1:0`` process.

Each test starts tests/programs/dashboard_app.py in a subprocess, reads the address
from the line it prints, and talks to it over real sockets. The shutdown tests send
SIGTERM with clients attached and time how long the process takes to exit.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
from pathlib import Path

import pytest

from tests.dashboard_helpers import (
    PATIENCE,
    EventStream,
    http,
    read_response,
    request_bytes,
    run_program,
    run_to_exit,
    wait_for,
)

pytestmark = pytest.mark.subprocess

#: Exit time allowed after SIGTERM when nothing is in flight: the drain is instant, so
#: this is the dashboard's shutdown plus process teardown (hypercorn's graceful
#: timeout is 2 s and an open stream would hold it that long).
QUICK_EXIT = 1.5
NO_JOBS = {"DASHBOARD_APP_WORKERS": "0"}


def test_api_drains_and_starts_one_service_while_the_others_run(tmp_path: Path) -> None:
    with run_program(tmp_path) as program:
        port, token = program.port, program.token
        wait_for(lambda: program.service("workers")["completed"] > 0, what="a completed job")

        status, _, body = http(port, "POST", "/api/services/workers/drain", token=token)
        assert status == 202, body
        assert json.loads(body)["services"][1]["state"] in ("draining", "stopped")
        wait_for(lambda: program.service("workers")["state"] == "stopped", what="workers stopped")
        states = {s["name"]: s["state"] for s in program.snapshot()["services"]}
        assert states == {"intake": "running", "workers": "stopped", "mailer": "running"}

        status, _, body = http(port, "POST", "/api/services/workers/start", token=token)
        assert status == 202, body
        wait_for(lambda: program.service("workers")["state"] == "running", what="workers running")

        status, _, body = http(port, "POST", "/api/services/nope/drain", token=token)
        assert status == 404
        assert "nope" in json.loads(body)["error"]

        code, _ = program.terminate()
        assert code == 0
        stderr = program.stderr()
    # The timeline and the audit log name who acted; the token is in neither.
    assert "drain service workers by api 127.0.0.1" in stderr
    assert "nursery_down.audit" in stderr
    assert token not in stderr


def test_generated_token_is_printed_once_and_never_logged(tmp_path: Path) -> None:
    with run_program(tmp_path, token=None) as program:
        assert len(program.token) >= 32
        status, headers, _ = http(program.port, "GET", f"/?token={program.token}")
        assert status == 303
        assert headers["location"] == "/"
        status, _, _ = http(program.port, "POST", "/api/drain", token=program.token)
        assert status == 202
        code = program.process.wait(PATIENCE)  # a whole-app drain ends the process
        stderr = program.stderr()
    assert code == 0
    assert stderr.count(program.token) == 1
    assert f"nursery_down dashboard: {program.url}/?token={program.token}" in stderr


def test_sigterm_with_open_event_streams_exits_promptly(tmp_path: Path) -> None:
    with run_program(tmp_path, **NO_JOBS) as program:
        streams = [EventStream(program.port, program.token) for _ in range(20)]
        for stream in streams:
            assert stream.next_message()[0] == "snapshot"
        code, seconds = program.terminate()
        assert code == 0
        assert seconds < QUICK_EXIT, f"took {seconds:.3f} s to exit"
        # Each stream was ended by the server, not cut by the process exiting.
        for stream in streams:
            assert stream.ended()
            stream.close()


def test_sigterm_with_an_idle_keep_alive_connection_exits_promptly(tmp_path: Path) -> None:
    with run_program(tmp_path, **NO_JOBS) as program:
        with socket.create_connection(("127.0.0.1", program.port), timeout=PATIENCE) as sock:
            sock.sendall(request_bytes(program.port, "GET", "/api/snapshot", token=program.token))
            status, headers, _ = read_response(sock)
            assert status == 200
            assert headers.get("connection", "").lower() != "close"
            # The connection now sits idle in keep-alive.
            code, seconds = program.terminate()
        assert code == 0
        assert seconds < QUICK_EXIT, f"took {seconds:.3f} s to exit"


def test_sigterm_with_a_client_that_stopped_reading_exits(tmp_path: Path) -> None:
    # Big snapshots (about 120 kB each), asked for 300 times on one connection that
    # never reads: the server's writes stall once the socket buffers are full.
    env = {"DASHBOARD_APP_INFO_BYTES": "20000", "DASHBOARD_APP_JOB": "0.1,0.2"}
    with run_program(tmp_path, **env) as program:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(PATIENCE)
        with sock:
            sock.connect(("127.0.0.1", program.port))
            one = request_bytes(
                program.port, "GET", "/api/snapshot?max_jobs=all", token=program.token
            )
            sock.sendall(one * 300)
            # The server's writes stall: the client's receive buffer holds data it never
            # reads, and the server's side of the connection has data it cannot send.
            client_port = sock.getsockname()[1]
            wait_for(
                lambda: unread_bytes(sock) > 0 and unsent_bytes(program.port, client_port) > 0,
                what="the server's writes to stall",
            )
            code, seconds = program.terminate()
    assert code == 0
    # The listening socket's TCP_USER_TIMEOUT (2 s) drops the stalled peer; without it
    # the process would never exit.
    assert seconds < 5.0, f"took {seconds:.3f} s to exit"


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in *sock*'s receive buffer."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))
    return int(count)


def unsent_bytes(local_port: int, remote_port: int) -> int:
    """Bytes written and not yet taken by the peer on the 127.0.0.1 TCP connection from
    *local_port* to *remote_port* (the tx_queue column of /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == (
            remote_port
        ):
            return int(queues.split(":")[0], 16)
    return 0


def test_event_stream_shows_a_drain_as_it_happens(tmp_path: Path) -> None:
    with run_program(tmp_path) as program:
        stream = EventStream(program.port, program.token)
        try:
            name, first = stream.next_message()
            assert name == "snapshot"
            assert [s["name"] for s in first["services"]] == ["intake", "workers", "mailer"]
            assert first["events"], "the first snapshot carries the recent timeline"
            status, _, _ = http(
                program.port, "POST", "/api/services/mailer/drain", token=program.token
            )
            assert status == 202
            _, event = stream.until(
                lambda n, d: n == "event" and d["service"] == "mailer" and d["state"] == "draining"
            )
            assert event["previous"] == "running"
            stream.until(lambda n, d: n == "event" and d["state"] == "stopped")
            _, snapshot = stream.until(lambda n, d: n == "snapshot")
            mailer = next(s for s in snapshot["services"] if s["name"] == "mailer")
            assert mailer["state"] == "stopped"
        finally:
            stream.close()
        assert program.terminate()[0] == 0


def test_non_loopback_address_without_token_refuses_to_start(tmp_path: Path) -> None:
    code, stderr = run_to_exit(tmp_path, "--dashboard", "0.0.0.0:0")
    assert code == 2
    assert "refusing to serve the dashboard on '0.0.0.0:0' without NURSERY_DOWN_TOKEN" in stderr


def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = run_to_exit(tmp_path, "--dashboard", f"127.0.0.1:{port}")
    assert code == 2
    assert f"127.0.0.1:{port}: the port is already in use" in stderr
    assert "Traceback" not in stderr
    assert "-> starting" not in stderr  # refused before any service ran


def test_bad_address_is_a_usage_error(tmp_path: Path) -> None:
    code, stderr = run_to_exit(tmp_path, "--dashboard", "localhost:http")
    assert code == 2
    assert "bad dashboard address 'localhost:http': expected HOST:PORT" in stderr
