"""Helpers for the dashboard tests: the target program in a subprocess, raw HTTP, SSE."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.polling import wait_for as wait_for

if TYPE_CHECKING:
    # mypy knows the source folder as "dashboard"; it is installed as nursery_down.dashboard.
    from dashboard import DashboardInfo as DashboardInfo
    from dashboard import create_app as create_app
    from dashboard import serve_dashboard as serve_dashboard
    from dashboard._view import in_flight_summary as in_flight_summary
else:
    from nursery_down.dashboard import DashboardInfo as DashboardInfo
    from nursery_down.dashboard import create_app as create_app
    from nursery_down.dashboard import serve_dashboard as serve_dashboard
    from nursery_down.dashboard._view import in_flight_summary as in_flight_summary

HERE = Path(__file__).resolve().parent
PROGRAM = HERE / "programs" / "dashboard_app.py"
TARGET = f"{PROGRAM}:sup"
TOKEN = "dashboard-test-token-4f0c7a"
ARTIFACTS = HERE.parent / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
#: Every wait on the program is bounded by this, so a hang fails instead of stalling.
PATIENCE = 15.0

URL_LINE = re.compile(r"nursery_down dashboard: (http://[^/\s]+)/(\?token=(\S+))?")

#: Exactly as PITFALLS.md says: Debian's Chromium, never a downloaded browser.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@dataclass
class Program:
    """``nursery-down run tests/programs/dashboard_app.py:sup`` running in a subprocess."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    url: str = ""
    token: str = TOKEN

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = PATIENCE) -> tuple[int, float]:
        """Send SIGTERM; return the exit code and the seconds until the process exited."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, time.monotonic() - sent

    def snapshot(self) -> dict[str, Any]:
        status, _, body = http(self.port, "GET", "/api/snapshot", token=self.token)
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def service(self, name: str) -> dict[str, Any]:
        return next(s for s in self.snapshot()["services"] if s["name"] == name)


@contextmanager
def run_program(
    tmp_path: Path,
    *,
    address: str = "127.0.0.1:0",
    token: str | None = TOKEN,
    target: str = TARGET,
    **env: str,
) -> Iterator[Program]:
    """Start the program (*target*) with a dashboard; wait for its URL line; kill it if
    still running."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    if token is not None:
        environment["NURSERY_DOWN_TOKEN"] = token
    environment.update(env)
    stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    command = [sys.executable, "-m", "nursery_down", "run", target, "--dashboard", address]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, stderr=stderr, stdout=subprocess.DEVNULL, env=environment
        )
    program = Program(process=process, stderr_path=stderr_path)
    try:

        def url_line() -> re.Match[str] | None:
            if process.poll() is not None:
                raise AssertionError(f"the program exited early:\n{program.stderr()}")
            return URL_LINE.search(program.stderr())

        match = wait_for(url_line, what="the dashboard's URL line")
        program.url = match.group(1)
        program.token = token if token is not None else match.group(3)
        yield program
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(PATIENCE)


def run_to_exit(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    """Run ``nursery-down run TARGET *args`` until it exits; return the code and stderr."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    environment.update(env)
    command = [sys.executable, "-m", "nursery_down", "run", TARGET, *args]
    result = subprocess.run(
        command, capture_output=True, env=environment, timeout=PATIENCE, check=False
    )
    return result.returncode, result.stderr.decode(errors="replace")


def request_bytes(
    port: int,
    method: str,
    path: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request as bytes, with Host and (if given) the bearer token."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one complete (Content-Length) response from *sock*."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed mid-body")
        rest += chunk
    return int(status_line.split()[1]), headers, rest[:length]


def http(
    port: int,
    method: str,
    path: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], str]:
    """One request on a fresh connection; (status, headers, body text)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        sock.sendall(request_bytes(port, method, path, token=token, headers=headers, body=body))
        status, response_headers, data = read_response(sock)
    return status, response_headers, data.decode()


class EventStream:
    """A raw-socket SSE client: reads ``/api/events`` and parses its messages."""

    def __init__(self, port: int, token: str, *, timeout: float = PATIENCE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(request_bytes(port, "GET", "/api/events", token=token))
        self._raw = b""  # bytes as received (chunked transfer coding)
        self._body = b""  # the decoded body not yet parsed
        self._finished = False
        while b"\r\n\r\n" not in self._raw:
            self._receive()
        head, _, self._raw = self._raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert status == 200, head
        assert b"text/event-stream" in head.lower(), head
        assert b"transfer-encoding: chunked" in head.lower(), head

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the connection closed")
        self._raw += chunk

    def _decode(self) -> None:
        while True:
            size_line, sep, rest = self._raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line, 16)
            if size == 0:
                self._finished = True
                return
            if len(rest) < size + 2:
                return
            self._body += rest[:size]
            self._raw = rest[size + 2 :]

    def next_message(self) -> tuple[str, Any]:
        """The next (event name, parsed data); comments are skipped. EOFError at the end."""
        while True:
            self._decode()
            while b"\n\n" not in self._body:
                if self._finished:
                    raise EOFError("the stream ended")
                self._receive()
                self._decode()
            block, _, self._body = self._body.partition(b"\n\n")
            name = ""
            data = []
            for line in block.decode().split("\n"):
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data.append(line.removeprefix("data: "))
            if name:
                return name, json.loads("\n".join(data))

    def until(self, predicate: Callable[[str, Any], bool]) -> tuple[str, Any]:
        """Read messages until *predicate(name, data)* holds for one; return it."""
        while True:
            name, data = self.next_message()
            if predicate(name, data):
                return name, data

    def ended(self) -> bool:
        """Read to the end; True if the server ended the stream properly (last chunk sent)."""
        try:
            while True:
                self.next_message()
        except (EOFError, OSError):
            return self._finished

    def close(self) -> None:
        self.sock.close()
