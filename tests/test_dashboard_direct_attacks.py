"""Attacks on the direct ``GET /api/snapshot`` answer: it must never disagree with the app.

The dashboard is served for real (``serve_dashboard`` on hypercorn); next to it runs a
reference server: the same kind of app, with the same hypercorn configuration and the
same admission wrapper, but without the direct answer, so that every request reaches
quart and its ``before_request`` checks. Each odd request is sent as raw bytes to both
and the answers (status, headers but Date and Content-Length, body with the job ages
left out) must be the same. ``snapshot_answer`` is wrapped (in the test, not in the
code) to note which requests the direct path answered, so that a comparison is known
to have exercised it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from hypercorn.trio import serve
from hypercorn.typing import HTTPScope

import nursery_down as nd
from tests.dashboard_helpers import create_app, serve_dashboard
from tests.test_dashboard_direct import make_supervisor as direct_supervisor

if TYPE_CHECKING:
    # mypy knows the source folder as "dashboard"; it is installed as nursery_down.dashboard.
    import dashboard._serve as serve_module
    from dashboard._address import resolve_address
    from dashboard._admission import admit_requests
    from dashboard._api import snapshot_answer
    from dashboard._app import SECURITY_HEADERS
    from dashboard._auth import allowed_host_headers
    from dashboard._context import DashboardContext, dashboard_context
    from dashboard._serve import _config, shield_sends
else:
    import nursery_down.dashboard._serve as serve_module
    from nursery_down.dashboard._address import resolve_address
    from nursery_down.dashboard._admission import admit_requests
    from nursery_down.dashboard._api import snapshot_answer
    from nursery_down.dashboard._app import SECURITY_HEADERS
    from nursery_down.dashboard._auth import allowed_host_headers
    from nursery_down.dashboard._context import DashboardContext, dashboard_context
    from nursery_down.dashboard._serve import _config, shield_sends

TOKEN = "direct-attack-token-7e2b9d41"
LIMIT = 15.0
#: Keys of a snapshot that change from one moment to the next.
VOLATILE = frozenset({"age", "oldest_job_age"})
#: Characters that would start a new line, or rewrite one, if written to a log as they are.
LINE_BREAKERS = ("\n", "\r", "\x1b", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029")


def make_supervisor() -> nd.Supervisor:
    return direct_supervisor(12, name="attacks")


# -- raw HTTP -------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def comparable(self) -> tuple[int, tuple[tuple[str, str], ...], Any]:
        """Status, headers but Date and Content-Length, and the body without job ages."""
        headers = tuple((k, v) for k, v in self.headers if k not in ("date", "content-length"))
        try:
            body: Any = scrub(json.loads(self.body))
        except ValueError:
            body = self.body
        return self.status, headers, body

    @property
    def is_snapshot(self) -> bool:
        return b'"services"' in self.body or b'"app":' in self.body


def scrub(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: scrub(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [scrub(item) for item in data]
    return data


async def exchange(
    port: int,
    data: bytes,
    *,
    methods: tuple[str, ...] = ("GET",),
    local_address: str | None = None,
) -> list[Answer]:
    """Send *data* as it is on a new connection; read one answer per entry of *methods*
    (HEAD answers have no body), skipping interim 1xx answers. An answer without
    Content-Length runs to the end of the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
    answers: list[Answer] = []
    buffer = b""
    closed = False

    async def more() -> None:
        nonlocal buffer, closed
        chunk = await stream.receive_some(65536)
        if not chunk:
            closed = True
        buffer += chunk

    async with stream:
        await stream.send_all(data)
        while len(answers) < len(methods):
            while b"\r\n\r\n" not in buffer:
                if closed:
                    raise AssertionError(f"closed before an answer: {buffer!r}")
                await more()
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            headers = []
            for line in lines:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
            if 100 <= status < 200:
                if status == 101:  # an upgrade: the rest is another protocol
                    answers.append(Answer(status, tuple(headers), b""))
                    return answers
                continue
            lengths = [v for k, v in headers if k == "content-length"]
            if methods[len(answers)] == "HEAD":
                length = 0
            elif lengths:
                length = int(lengths[0])
            else:
                while not closed:
                    await more()
                length = len(buffer)
            while len(buffer) < length:
                if closed:
                    raise AssertionError("closed mid-body")
                await more()
            answers.append(Answer(status, tuple(headers), buffer[:length]))
            buffer = buffer[length:]
    return answers


def request(
    host: bytes | None,
    *,
    target: bytes = b"/api/snapshot",
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    authorization: bytes | None = b"Bearer " + TOKEN.encode(),
    extra: bytes = b"",
    body: bytes = b"",
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    if authorization is not None:
        lines.append(b"Authorization: " + authorization)
    head = b"\r\n".join(lines) + b"\r\n" + extra
    return head + b"\r\n" + body


# -- the served dashboard and its reference -------------------------------------------


@dataclass
class Served:
    sup: nd.Supervisor
    port: int
    reference_port: int
    #: (path, query) of every request the direct path answered.
    direct: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def host(self) -> bytes:
        return f"127.0.0.1:{self.port}".encode()

    async def both(
        self, data: bytes, *, methods: tuple[str, ...] = ("GET",)
    ) -> tuple[list[Answer], list[Answer]]:
        served = await exchange(self.port, data, methods=methods)
        reference = await exchange(self.reference_port, data, methods=methods)
        return served, reference


def recording(answered: list[tuple[str, bytes]]) -> Callable[..., Any]:
    """``snapshot_answer`` that notes each request it answered."""

    def make(context: DashboardContext) -> Callable[[HTTPScope], bytes | None]:
        real = snapshot_answer(context)

        def answer(scope: HTTPScope) -> bytes | None:
            result = real(scope)
            if result is not None:
                answered.append((scope["path"], scope["query_string"]))
            return result

        return answer

    return make


async def start_reference(
    nursery: trio.Nursery,
    sup: nd.Supervisor,
    allowed: frozenset[str],
    *,
    direct: bool = False,
    root_path: str = "",
) -> int:
    app = create_app(sup, token=TOKEN, allowed_hosts=allowed)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port: int = sock.getsockname()[1]
    config = _config(f"fd://{os.dup(sock.fileno())}")
    sock.close()  # hypercorn serves its own duplicate
    config.root_path = root_path
    answer = snapshot_answer(dashboard_context(app)) if direct else None
    wrapped = admit_requests(shield_sends(app), SECURITY_HEADERS, direct=answer)
    nursery.start_soon(partial(serve, wrapped, config))
    # Wait until it answers.
    with trio.fail_after(LIMIT):
        while True:
            try:
                await exchange(port, request(b"x", target=b"/livez", authorization=None))
                return port
            except OSError:
                await trio.sleep(0.01)


@pytest.fixture
async def served(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    sup = make_supervisor()
    answered: list[tuple[str, bytes]] = []
    monkeypatch.setattr(serve_module, "snapshot_answer", recording(answered))
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(
            partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN, allowed_hosts=[])
        )
        port = int(info.url.rsplit(":", 1)[1])
        allowed = allowed_host_headers(await resolve_address(f"127.0.0.1:{port}"))
        reference_port = await start_reference(nursery, sup, allowed)
    yield Served(sup, port, reference_port, answered)
    with trio.fail_after(LIMIT):
        await sup.escalate()
        await sup.wait_finished()
    nursery.cancel_scope.cancel()  # the reference server


def cases(port: int) -> dict[str, bytes]:
    """Odd requests for /api/snapshot, by name (the Host names the served port)."""
    host = f"127.0.0.1:{port}".encode()
    token = TOKEN.encode()
    p = str(port).encode()
    plain = partial(request, host)
    return {
        # Host
        "plain": plain(),
        "Host in capitals": request(b"LOCALHOST:" + p),
        "Host localhost": request(b"localhost:" + p),
        "Host with a trailing dot": request(b"localhost.:" + p),
        "Host with a dot after the port": request(host + b"."),
        "Host without the port": request(b"127.0.0.1"),
        "Host with another port": request(b"127.0.0.1:1"),
        "Host with a zero-padded port": request(b"127.0.0.1:0" + p),
        "Host with a no-break space": request(host + b"\xa0"),
        "Host with NEL before": request(b"\x85" + host),
        "Host with a tab inside": request(b"127.0.0.1:\t" + p),
        "Host IPv6 loopback": request(b"[::1]:" + p),
        "Host IPv4-mapped": request(b"[::ffff:127.0.0.1]:" + p),
        "Host 127.1": request(b"127.1:" + p),
        "Host with userinfo": request(b"evil@" + host),
        "Host list": request(host + b", evil.example"),
        "Host empty": request(b""),
        "two Hosts, the right first": request(host, extra=b"Host: evil.example\r\n"),
        "two Hosts, the same": request(host, extra=b"Host: " + host + b"\r\n"),
        "HTTP/1.0 without Host": request(None, version=b"HTTP/1.0"),
        "HTTP/1.0 with Host": request(host, version=b"HTTP/1.0"),
        "HTTP/1.1 without Host": request(None),
        "absolute form, evil": request(host, target=b"http://evil.example/api/snapshot"),
        "absolute form, ours": request(host, target=b"http://" + host + b"/api/snapshot"),
        "absolute form, no Host": request(None, target=b"http://" + host + b"/api/snapshot"),
        # Authorization
        "scheme lower case": plain(authorization=b"bearer " + token),
        "scheme upper case": plain(authorization=b"BEARER " + token),
        "two spaces": plain(authorization=b"Bearer  " + token),
        "a tab for the space": plain(authorization=b"Bearer\t" + token),
        "a tab after the space": plain(authorization=b"Bearer \t" + token),
        "token then no-break space": plain(authorization=b"Bearer " + token + b"\xa0"),
        "token then NEL": plain(authorization=b"Bearer " + token + b"\x85"),
        "token then a tab": plain(authorization=b"Bearer " + token + b"\t"),
        "token then a space and junk": plain(authorization=b"Bearer " + token + b" x"),
        "token in UTF-8 junk": plain(authorization=b"Bearer " + token + b"\xc3\xa9"),
        "token cut": plain(authorization=b"Bearer " + token[:-1]),
        "token doubled": plain(authorization=b"Bearer " + token + token),
        "token, no scheme": plain(authorization=token),
        "Basic scheme": plain(authorization=b"Basic " + token),
        "folded header": plain(authorization=b"Bearer\r\n " + token),
        "two tokens, right first": plain(extra=b"Authorization: Bearer nope\r\n"),
        "two tokens, wrong first": plain(
            authorization=b"Bearer nope", extra=b"Authorization: Bearer " + token + b"\r\n"
        ),
        "two identical tokens": plain(extra=b"Authorization: Bearer " + token + b"\r\n"),
        "no token": plain(authorization=None),
        "token in Proxy-Authorization": plain(
            authorization=None, extra=b"Proxy-Authorization: Bearer " + token + b"\r\n"
        ),
        "token in the query": plain(authorization=None, target=b"/api/snapshot?token=" + token),
        "a forged cookie": plain(authorization=None, extra=b"Cookie: nursery_down_x=y\r\n"),
        # query
        "?": plain(target=b"/api/snapshot?"),
        "?&": plain(target=b"/api/snapshot?&"),
        "max_jobs=5": plain(target=b"/api/snapshot?max_jobs=5"),
        "max_jobs=01": plain(target=b"/api/snapshot?max_jobs=01"),
        "max_jobs=0": plain(target=b"/api/snapshot?max_jobs=0"),
        "max_jobs=+5": plain(target=b"/api/snapshot?max_jobs=+5"),
        "max_jobs=%35": plain(target=b"/api/snapshot?max_jobs=%35"),
        "max_jobs=5#x": plain(target=b"/api/snapshot?max_jobs=5#x"),
        "max_jobs=5&": plain(target=b"/api/snapshot?max_jobs=5&"),
        "&max_jobs=5": plain(target=b"/api/snapshot?&max_jobs=5"),
        "max_jobs=5;x": plain(target=b"/api/snapshot?max_jobs=5;x"),
        "max_jobs=5=6": plain(target=b"/api/snapshot?max_jobs=5=6"),
        "max_jobs=": plain(target=b"/api/snapshot?max_jobs="),
        "max_jobs=-1": plain(target=b"/api/snapshot?max_jobs=-1"),
        "max_jobs=all": plain(target=b"/api/snapshot?max_jobs=all"),
        "max_jobs=ALL": plain(target=b"/api/snapshot?max_jobs=ALL"),
        "max_jobs=9 digits": plain(target=b"/api/snapshot?max_jobs=999999999"),
        "max_jobs=10 digits": plain(target=b"/api/snapshot?max_jobs=1000000000"),
        "max_jobs=8000 digits": plain(target=b"/api/snapshot?max_jobs=" + b"1" * 8000),
        "max_jobs=arabic 5 raw": plain(target=b"/api/snapshot?max_jobs=\xd9\xa5"),
        "max_jobs=arabic 5 encoded": plain(target=b"/api/snapshot?max_jobs=%D9%A5"),
        "max%5Fjobs=5": plain(target=b"/api/snapshot?max%5Fjobs=5"),
        "MAX_JOBS=5": plain(target=b"/api/snapshot?MAX_JOBS=5"),
        "bare max_jobs": plain(target=b"/api/snapshot?max_jobs"),
        "huge query": plain(target=b"/api/snapshot?" + b"a" * 20000),
        # path
        "trailing slash": plain(target=b"/api/snapshot/"),
        "double slash": plain(target=b"//api/snapshot"),
        "encoded letter": plain(target=b"/api/%73napshot"),
        "encoded slash": plain(target=b"/api%2Fsnapshot"),
        "capitals": plain(target=b"/API/snapshot"),
        "semicolon": plain(target=b"/api/snapshot;x"),
        "encoded NUL": plain(target=b"/api/snapshot%00"),
        "encoded newline": plain(target=b"/api/snapshot%0A"),
        "dot segment": plain(target=b"/./api/snapshot"),
        "dot-dot segment": plain(target=b"/api/../api/snapshot"),
        "encoded question mark": plain(target=b"/api/snapshot%3Fmax_jobs=1"),
        "asterisk": plain(target=b"*"),
        # methods and bodies
        "HEAD": plain(method=b"HEAD"),
        "POST": plain(method=b"POST", extra=b"Content-Length: 0\r\n"),
        "PUT": plain(method=b"PUT", extra=b"Content-Length: 0\r\n"),
        "OPTIONS": plain(method=b"OPTIONS"),
        "DELETE": plain(method=b"DELETE"),
        "lower-case get": plain(method=b"get"),
        "GEt": plain(method=b"GEt"),
        "GET with a body": plain(extra=b"Content-Length: 5\r\n", body=b"hello"),
        "GET with a chunked body": plain(
            extra=b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n0\r\n\r\n"
        ),
        "GET with Expect": plain(
            extra=b"Expect: 100-continue\r\nContent-Length: 2\r\n", body=b"{}"
        ),
        "GET with a form body": plain(
            extra=b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n",
            body=b"max_jobs=",
        ),
        "GET asking for HTML": plain(extra=b"Accept: text/html\r\n"),
        "GET from another site": plain(
            extra=b"Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n"
        ),
        "GET with Connection: close": plain(extra=b"Connection: close\r\n"),
    }


#: Cases the direct path must answer (and so the comparison exercises it).
ANSWERED_DIRECTLY = frozenset(
    {
        "plain",
        "Host in capitals",
        "Host localhost",
        "Host with a no-break space",
        "HTTP/1.0 with Host",
        "scheme lower case",
        "two spaces",
        "token then no-break space",
        "?",
        "max_jobs=5",
        "max_jobs=01",
        "max_jobs=all",
        "encoded letter",
        "encoded slash",
        "GET with a body",
        "GET asking for HTML",
        "GET from another site",
    }
)


def method_of(data: bytes) -> str:
    return "HEAD" if data.startswith(b"HEAD ") else "GET"


async def test_every_odd_request_gets_the_apps_answer(served: Served) -> None:
    """Each odd request: the served dashboard (direct path) and the app alone agree."""
    disagreements = {}
    answered = set()
    with trio.fail_after(LIMIT * 4):
        for name, data in cases(served.port).items():
            before = len(served.direct)
            methods = (method_of(data),)
            (mine,), (theirs,) = await served.both(data, methods=methods)
            if len(served.direct) > before:
                answered.add(name)
                assert mine.status == 200, name
            if mine.comparable() != theirs.comparable():
                disagreements[name] = (mine.comparable(), theirs.comparable())
    assert disagreements == {}
    assert answered >= ANSWERED_DIRECTLY, ANSWERED_DIRECTLY - answered


async def test_a_snapshot_never_goes_without_the_token(served: Served) -> None:
    """No variant without the exact operator token (or with it, but by a Host not
    allowed) gets a snapshot, directly or not. (An absolute-form target naming another
    host, with the token and our Host header, is answered 200 by the app itself: quart
    routes by the target's path; the direct path leaves it to the app.)"""
    data = cases(served.port)
    without = [
        "token cut",
        "token doubled",
        "token, no scheme",
        "Basic scheme",
        "token then a space and junk",
        "token in UTF-8 junk",
        "a tab for the space",
        "two tokens, wrong first",
        "no token",
        "token in Proxy-Authorization",
        "token in the query",
        "a forged cookie",
        "Host with another port",
        "Host with a trailing dot",
        "Host IPv4-mapped",
    ]
    with trio.fail_after(LIMIT):
        for name in without:
            before = len(served.direct)
            (answer,) = await exchange(served.port, data[name])
            assert len(served.direct) == before, name
            assert answer.status in (400, 401, 421), (name, answer)
            assert not answer.is_snapshot, name
            if answer.status == 401:
                assert answer.header("www-authenticate") == 'Bearer realm="nursery_down"'


async def test_pipelined_requests_get_the_apps_answers(served: Served) -> None:
    """Plain, wrong-token, with-body and HEAD requests pipelined on one connection."""
    host = served.host
    data = (
        request(host)
        + request(host, authorization=b"Bearer nope")
        + request(host, extra=b"Content-Length: 26\r\n", body=b"GET /api/snapshot HTTP/1.1")
        + request(host, target=b"/api/snapshot?max_jobs=1")
        + request(host, method=b"HEAD")
        + request(host, target=b"/api/snapshot?max_jobs=%31")
    )
    methods = ("GET", "GET", "GET", "GET", "HEAD", "GET")
    with trio.fail_after(LIMIT):
        mine, theirs = await served.both(data, methods=methods)
    assert [a.status for a in mine] == [200, 401, 200, 200, 200, 200]
    assert [a.comparable() for a in mine] == [a.comparable() for a in theirs]
    assert len(served.direct) == 3  # the plain ones; the body of the third is not a request
    assert json.loads(mine[3].body)["services"][0]["jobs_hidden"] == 11


async def test_http2_answers_are_the_apps(served: Served) -> None:
    """The same over HTTP/2 (prior knowledge): :authority is the Host that is checked."""
    variants: list[tuple[str, dict[str, str], int]] = [
        ("/api/snapshot", {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("/api/snapshot?max_jobs=2", {"Authorization": f"bearer  {TOKEN}"}, 200),
        ("/api/snapshot", {"Authorization": "Bearer nope"}, 401),
        ("/api/snapshot", {}, 401),
        ("/api/snapshot?max_jobs=x", {"Authorization": f"Bearer {TOKEN}"}, 400),
    ]
    with trio.fail_after(LIMIT):
        async with httpx.AsyncClient(http1=False, http2=True, timeout=LIMIT) as client:
            for path, headers, status in variants:
                host = {"Host": served.host.decode()}
                mine = await client.get(
                    f"http://127.0.0.1:{served.port}{path}", headers=headers | host
                )
                theirs = await client.get(
                    f"http://127.0.0.1:{served.reference_port}{path}", headers=headers | host
                )
                assert mine.http_version == theirs.http_version == "HTTP/2"
                assert mine.status_code == theirs.status_code == status, path
                drop = {"date", "content-length"}
                assert [(k, v) for k, v in mine.headers.items() if k not in drop] == [
                    (k, v) for k, v in theirs.headers.items() if k not in drop
                ]
                assert scrub(mine.json()) == scrub(theirs.json())
            wrong_host = await client.get(
                f"http://127.0.0.1:{served.port}/api/snapshot",
                headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"},
            )
            assert wrong_host.status_code == 421
    assert len(served.direct) == 2


async def test_a_throttled_address_is_refused_both_ways(served: Served) -> None:
    """Ten wrong tokens, then the right one in every form the direct path accepts: 429
    (as the app answers), and the direct path answers none of them. Another address
    (127.0.0.2) is not throttled."""
    host = served.host
    with trio.fail_after(LIMIT):
        for _ in range(10):
            (answer,) = await exchange(served.port, request(host, authorization=b"Bearer no"))
            assert answer.status == 401
        before = len(served.direct)
        right = [
            request(host),
            request(b"LOCALHOST:" + str(served.port).encode()),
            request(host, authorization=b"bearer  " + TOKEN.encode()),
            request(host, target=b"/api/snapshot?max_jobs=all"),
            request(host, target=b"/api/%73napshot?"),
            request(host, version=b"HTTP/1.0"),
        ]
        for data in right:
            (answer,) = await exchange(served.port, data)
            assert answer.status == 429, answer
            assert answer.header("retry-after") is not None
            assert not answer.is_snapshot
        async with httpx.AsyncClient(http1=False, http2=True, timeout=LIMIT) as client:
            over_h2 = await client.get(
                f"http://127.0.0.1:{served.port}/api/snapshot",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert over_h2.status_code == 429
        assert len(served.direct) == before
        # The reference app refuses the same way after the same ten guesses.
        for _ in range(10):
            await exchange(served.reference_port, request(host, authorization=b"Bearer no"))
        (theirs,) = await exchange(served.reference_port, request(host))
        assert theirs.status == 429
        (mine,) = await exchange(served.port, request(host))
        assert mine.comparable()[:2] == theirs.comparable()[:2]
        # Another address is not throttled, and is answered directly.
        (other,) = await exchange(served.port, request(host), local_address="127.0.0.2")
        assert other.status == 200
        assert len(served.direct) == before + 1


async def test_no_log_line_carries_raw_request_text(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Odd requests, wrong tokens up to throttling and unsafe methods with control
    characters: no log record carries them raw, nor the token."""
    caplog.set_level(logging.DEBUG)
    host = served.host
    marker = b"FORGED-LINE"
    with trio.fail_after(LIMIT * 2):
        for data in cases(served.port).values():
            await exchange(served.port, data, methods=(method_of(data),))
        for target in (b"/api/snapshot%0A" + marker, b"/api/snapshot%1B[2K" + marker):
            await exchange(served.port, request(host, target=target, authorization=None))
            post = request(
                host,
                target=target,
                method=b"POST",
                authorization=b"Bearer x%0A",
                extra=b"Content-Length: 0\r\n",
            )
            await exchange(served.port, post)
        for _ in range(12):
            wrong = request(host, authorization=b"Bearer " + marker + b"\x85\xe2\x80\xa8")
            await exchange(served.port, wrong)
    messages = [record.getMessage() for record in caplog.records]
    assert any("refused 429" in m for m in messages), messages  # the throttling was logged
    for message in messages:
        assert TOKEN not in message
        for breaker in LINE_BREAKERS:
            assert breaker not in message, message
        assert "FORGED-LINE" not in message or "\\" in message, message


async def test_below_a_root_path_the_app_answers(
    nursery: trio.Nursery,
) -> None:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        allowed = frozenset({"127.0.0.1:8080"})
        with_direct = await start_reference(nursery, sup, allowed, direct=True, root_path="/ops")
        app_only = await start_reference(nursery, sup, allowed, root_path="/ops")
        host = b"127.0.0.1:8080"
        # Inside the root path both agree: the direct path leaves it to the app.
        inside = request(host, target=b"/ops/api/snapshot")
        (mine,) = await exchange(with_direct, inside)
        (theirs,) = await exchange(app_only, inside)
        assert mine.status == theirs.status == 200
        outside = request(host)
        (mine,) = await exchange(with_direct, outside)
        (theirs,) = await exchange(app_only, outside)
        await sup.escalate()
        await sup.wait_finished()
        nursery.cancel_scope.cancel()
    # Outside the root path: the app's 404 both ways, never a direct 200.
    assert (mine.status, theirs.status) == (404, 404)
