"""The operator commands against wrong addresses, wrong tokens and wrong answers.

Each refusal is one line on stderr and exit code 2. The answers come from a tiny real
HTTP server in a thread, which serves whatever the first segment of the path names.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nursery_down._cli import main

SERVICE: dict[str, object] = {
    "name": "workers",
    "state": "running",
    "in_flight": 2,
    "completed": 7,
    "failed": 0,
    "hard_cancelled": 0,
    "restarts": 0,
    "health": "ok",
    "oldest_job_age": 1.5,
}
SNAPSHOT = {"app": "shop", "pid": 4321, "state": "running", "services": [SERVICE]}

#: What the server answers under each first path segment.
ANSWERS: dict[str, bytes] = {
    "ops": json.dumps(SNAPSHOT).encode(),
    "object": b"{}",
    "list": b"[]",
    "null": b"null",
    "latin": b"\xff\xfe\x00{not utf-8}",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "number": b"1e999999",
    "text": b"<html>a proxy's page</html>",
    "wrong-types": json.dumps({**SNAPSHOT, "services": [{**SERVICE, "in_flight": "2"}]}).encode(),
    # A program whose upgrades may take longer than a socket can wait.
    "patient": json.dumps({**SNAPSHOT, "upgrade_timeout": 1e300, "upgraded_to": 99}).encode(),
}

#: Seconds any request to the test server may take.
TIMEOUT = 10.0


@pytest.fixture
def server() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """The server's base URL, and the (method, path, Authorization) of each request."""
    seen: list[tuple[str, str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append((self.command, self.path, self.headers.get("Authorization", "")))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            segment = self.path.strip("/").split("/")[0]
            if segment == "refuse":
                status, body = 409, b'{"error": "line one\\nline two\\u2028three"}'
            elif segment == "refuse-badly":
                status, body = 500, b"\xff\xfe oops"
            else:
                status, body = 200, ANSWERS.get(segment, b"{}")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # the name http.server calls
            self.answer()

        def do_POST(self) -> None:
            self.answer()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.timeout = TIMEOUT
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NURSERY_DOWN_URL", "NURSERY_DOWN_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, expected: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("nursery-down: error: ")
    assert err.count("\n") == 1, err
    assert err.endswith("\n")
    assert expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:abc", "bad URL 'http://127.0.0.1:abc'"),
        ("http://127.0.0.1:99999", "bad URL"),
        ("http://exa mple.com", "contains a space or a control character"),
        ("http://exa\r\nmple.com", "contains a space or a control character"),
        ("http://[::1", "bad URL"),
        ("http://", "not an http(s) URL"),
        ("http://:8080", "not an http(s) URL"),
        ("ftp://example", "not an http(s) URL"),
        ("http://127.0.0.1:0", "port 0"),
    ],
)
def test_a_bad_url_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], url: str, expected: str
) -> None:
    assert_one_line_error(*run_cli(capsys, "status", "--url", url, "--token", "t"), expected)


@pytest.mark.parametrize(
    "name", ["../x", "db/primary", "a b", "café", ".hidden", "x" * 65, "%2e%2e"]
)
@pytest.mark.parametrize(
    "command",
    [
        ("drain",),
        ("restart",),
        ("escalate",),
        ("start",),
        ("dead", "list"),
        ("status",),
        ("extend-grace", "5"),
        ("fleet", "drain", "proc"),
    ],
)
def test_a_name_no_service_can_have_is_one_line_and_asks_nothing(
    capsys: pytest.CaptureFixture[str],
    server: tuple[str, list[tuple[str, str, str]]],
    command: tuple[str, ...],
    name: str,
) -> None:
    url, seen = server
    result = run_cli(capsys, *command, name, "--url", url, "--token", "t")
    assert_one_line_error(*result, "no service can be named")
    assert seen == []  # refused before any request


def test_upgrade_waits_at_most_a_day_however_long_the_programs_timeout(
    capsys: pytest.CaptureFixture[str], server: tuple[str, list[tuple[str, str, str]]]
) -> None:
    url, seen = server
    code, out, err = run_cli(capsys, "upgrade", "--url", f"{url}/patient", "--token", "t")
    assert code == 0, err
    assert "the new generation (pid 99) is ready" in err
    assert out.startswith("shop (pid 4321): running")
    assert [method for method, _, _ in seen] == ["GET", "POST"]


@pytest.mark.parametrize("token", ["tökén", "a\r\nInjected: yes", "tab\there", "\x00"])
def test_a_token_that_cannot_go_in_a_header_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], server: tuple[str, list[tuple[str, str, str]]], token: str
) -> None:
    url, seen = server
    result = run_cli(capsys, "drain", "--url", f"{url}/ops", "--token", token)
    assert_one_line_error(*result, "the token has a character that cannot go in an HTTP header")
    assert seen == []  # nothing was sent


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("object", "did not answer a nursery_down snapshot (no list of services)"),
        ("list", "did not answer a nursery_down snapshot (a JSON list, not an object)"),
        ("null", "did not answer a nursery_down snapshot (a JSON null, not an object)"),
        ("number", "did not answer a nursery_down snapshot (a JSON float, not an object)"),
        ("latin", "did not answer JSON"),
        ("deep", "did not answer JSON"),
        ("text", "did not answer JSON"),
        ("wrong-types", "without the fields of a snapshot"),
    ],
)
@pytest.mark.parametrize("command", [("status",), ("drain", "workers"), ("extend-grace", "5")])
def test_an_answer_that_is_no_snapshot_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    server: tuple[str, list[tuple[str, str, str]]],
    command: tuple[str, ...],
    segment: str,
    expected: str,
) -> None:
    url, _ = server
    result = run_cli(capsys, *command, "--url", f"{url}/{segment}/", "--token", "t")
    assert_one_line_error(*result, expected)


def test_a_refusal_from_the_server_is_one_line(
    capsys: pytest.CaptureFixture[str], server: tuple[str, list[tuple[str, str, str]]]
) -> None:
    url, _ = server
    refused = run_cli(capsys, "drain", "--url", f"{url}/refuse", "--token", "t")
    assert_one_line_error(*refused, "line one line two three")
    garbled = run_cli(capsys, "drain", "--url", f"{url}/refuse-badly", "--token", "t")
    assert_one_line_error(*garbled, "500 Internal Server Error")


def test_a_path_in_the_url_is_kept(
    capsys: pytest.CaptureFixture[str], server: tuple[str, list[tuple[str, str, str]]]
) -> None:
    url, seen = server
    code, out, err = run_cli(capsys, "status", "--url", f"{url}/ops/?token=from-the-url")
    assert code == 0, err
    assert out.splitlines()[0] == "shop (pid 4321): running"
    code, _, err = run_cli(capsys, "drain", "workers", "--url", f"{url}/ops", "--token", "t2")
    assert code == 0, err
    assert seen == [
        ("GET", "/ops/api/snapshot", "Bearer from-the-url"),
        ("POST", "/ops/api/services/workers/drain", "Bearer t2"),
    ]


def test_without_url_the_commands_go_to_port_8080_of_this_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        with socket.create_connection(("127.0.0.1", 8080), timeout=TIMEOUT):
            pass
    except ConnectionRefusedError:
        pass
    else:
        pytest.skip("something listens on 127.0.0.1:8080, the default address")
    for command in (("status",), ("drain",), ("extend-grace", "5")):
        result = run_cli(capsys, *command, "--token", "t")
        assert_one_line_error(*result, "cannot reach http://127.0.0.1:8080: ")


def test_without_url_the_commands_go_to_nursery_down_url(
    capsys: pytest.CaptureFixture[str],
    server: tuple[str, list[tuple[str, str, str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, seen = server
    monkeypatch.setenv("NURSERY_DOWN_URL", f"{url}/ops")
    code, out, err = run_cli(capsys, "status", "--token", "t")
    assert code == 0, err
    assert out.splitlines()[0] == "shop (pid 4321): running"
    assert seen == [("GET", "/ops/api/snapshot", "Bearer t")]
