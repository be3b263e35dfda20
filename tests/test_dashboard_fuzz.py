"""Hypothesis against the real dashboard: random paths, methods, headers and bodies.

Each example starts a fresh supervisor and dashboard on real hypercorn (an example may
well drain or escalate the whole app), sends one raw HTTP/1.1 request over a socket,
and checks what came back and what was logged:

- never a 5xx, and no log record at ERROR or carrying a traceback;
- every log line is one line;
- every JSON body is valid JSON (no NaN or Infinity);
- every non-2xx answer is JSON with an ``error`` string, except where HTML is the
  design: redirects (3xx: a sign-in, a sign-out or a form posted without JavaScript
  goes back to the page), and the pages a browser asks for (``/``, ``/login``, or a
  request whose ``Accept`` asks for ``text/html`` and not ``application/json``),
  which get an HTML error page. ``HEAD`` answers have no body to check.

``GET /api/events`` is left out: it is a stream that answers for as long as it is open.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import quote, unquote

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import nursery_down as nd
from tests.dashboard_helpers import serve_dashboard

TOKEN = "fuzz-test-token-3c9d0e51"
LIMIT = 10.0

SEGMENTS = [
    "api",
    "services",
    "alpha",
    "beta",
    "gone",
    "drain",
    "start",
    "restart",
    "escalate",
    "extend-grace",
    "upgrade",
    "snapshot",
    "livez",
    "readyz",
    "metrics",
    "login",
    "logout",
    "static",
    "app.js",
    "style.css",
    "..",
    ".",
    "",
    "%2F",
    "%00",
    "%0A",
    "%E2%80%A8",
]

#: Header values hypercorn accepts (no control characters); latin-1 beyond ASCII too.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_categories=["Cc"]),
    max_size=60,
).map(str.strip)

segment = st.one_of(
    st.sampled_from(SEGMENTS),
    st.text(max_size=12).map(lambda text: quote(text, safe="")),
)

query = st.lists(
    st.tuples(
        st.sampled_from(["token", "max_jobs", "service", "x"]),
        st.one_of(
            st.sampled_from(["all", "0", "50", "²", "1" * 5000, TOKEN, ""]),
            st.text(max_size=20),
        ),
    ),
    max_size=3,
).map(lambda pairs: "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in pairs))

service = st.one_of(st.sampled_from(["alpha", "beta", "gone"]), segment)
action = st.one_of(st.sampled_from(["drain", "start", "restart", "escalate"]), segment)

#: The routes there are (most examples), and anything else.
route = st.one_of(
    st.sampled_from(
        [
            "/api/snapshot",
            "/api/drain",
            "/api/restart",
            "/api/escalate",
            "/api/extend-grace",
            "/api/upgrade",
            "/",
            "/login",
            "/logout",
            "/livez",
            "/readyz",
            "/metrics",
            "/static/app.js",
        ]
    ),
    st.tuples(service, action).map(lambda parts: f"/api/services/{parts[0]}/{parts[1]}"),
    st.lists(segment, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts)),
)

path = st.tuples(route, query).map(lambda parts: parts[0] + (f"?{parts[1]}" if parts[1] else ""))

json_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**300, max_value=10**400),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["alpha", "beta", "10", "1e308", "NaN", "-1"]),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def encode_json(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity allowed: hostile bodies


body = st.one_of(
    st.just(b""),
    st.fixed_dictionaries(
        {}, optional={"grace": json_value, "seconds": json_value, "service": json_value}
    ).map(encode_json),
    st.dictionaries(
        st.sampled_from(["grace", "seconds", "service", "token", "x"]), json_value, max_size=3
    ).map(encode_json),
    json_value.map(encode_json),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"[" * 8000 + b"]" * 8000,
            b'{"grace": 1' + b"0" * 400 + b"}",
            b'{"seconds": 1e999}',
            b"grace=NaN&seconds=10&service=alpha",
            b"token=" + TOKEN.encode(),
            b"x" * 20_000,
        ]
    ),
)


def usually(common: Any, *others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """*common* in about two examples of three, else one of *others*."""
    return st.one_of(st.just(common), st.just(common), st.just(common), *others)


#: Most requests are ones the dashboard would act on (the right token, Host and type),
#: so that the examples reach the routes' own parsing; any header may be hostile.
headers = st.fixed_dictionaries(
    {
        "Authorization": usually(
            f"Bearer {TOKEN}",
            st.just(None),
            header_text,
            header_text.map(lambda t: f"Bearer {t}"),
        ),
        "Host": usually(
            "SELF", st.sampled_from(["localhost:1", "evil.example", None]), header_text
        ),
        "Content-Type": usually(
            "application/json",
            st.sampled_from(
                [
                    None,
                    "application/x-www-form-urlencoded",
                    "multipart/form-data",
                    "multipart/form-data; boundary=x",
                    "text/plain",
                    "application/merge-patch+json",
                ]
            ),
            header_text,
        ),
    },
    optional={
        "Accept": st.one_of(
            st.sampled_from(["application/json", "text/html", "*/*", "text/html,application/json"]),
            header_text,
        ),
        "Origin": st.one_of(st.sampled_from(["SELF", "http://evil.example", "null"]), header_text),
        "Sec-Fetch-Site": st.one_of(
            st.sampled_from(["same-origin", "cross-site", "none"]), header_text
        ),
        "Cookie": header_text,
        "User-Agent": header_text,
    },
).map(lambda fields: {name: value for name, value in fields.items() if value is not None})


def make_supervisor() -> nd.Supervisor:
    sup = nd.Supervisor(name="fuzz", grace=30.0)

    @sup.service
    async def alpha(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job(float("nan"), ratio=float("inf")):
            await ctx.wait_draining()

    @sup.service
    async def beta(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    return sup


@asynccontextmanager
async def dashboard() -> AsyncIterator[int]:
    """A fresh supervisor and dashboard; yields the port."""
    sup = make_supervisor()
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
        yield int(info.url.rsplit(":", 1)[1])
        if sup.running:
            await sup.escalate()
        await sup.wait_finished()


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send *request*, read to the end; (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, content = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    response_headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), response_headers, content


def build_request(
    port: int, method: str, target: str, fields: dict[str, str], content: bytes
) -> bytes:
    self_host = f"127.0.0.1:{port}"
    fields = {
        name: (self_host if value == "SELF" and name == "Host" else value)
        for name, value in fields.items()
    }
    if fields.get("Origin") == "SELF":
        fields["Origin"] = f"http://{self_host}"
    # HTTP/1.1 requires a Host header (the server itself refuses a request without);
    # HTTP/1.0 does not, and reaches the dashboard without one.
    version = "HTTP/1.1" if "Host" in fields else "HTTP/1.0"
    lines = [f"{method} {target} {version}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in fields.items()]
    if method not in ("GET", "HEAD") or content:
        lines.append(f"Content-Length: {len(content)}")
    else:
        content = b""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


def strict_json(content: bytes) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(content, parse_constant=refuse)


def is_page_request(target: str, fields: dict[str, str]) -> bool:
    """A request whose errors are an HTML page by design (see the module docstring)."""
    accept = fields.get("Accept", "")
    # The router merges repeated slashes: "//login" is the sign-in page too.
    page = re.sub("/+", "/", unquote(target.partition("?")[0])) in ("/", "/login")
    return page or ("text/html" in accept and "application/json" not in accept)


async def check_one_request(
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    fields: dict[str, str],
    content: bytes,
) -> None:
    """Send one request to a fresh dashboard and check the answer and the log."""
    route = re.sub("/+", "/", unquote(target.partition("?")[0]))
    if method == "GET" and route.rstrip("/") == "/api/events":
        return  # a stream: it answers for as long as it is open
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(LIMIT):
        async with dashboard() as port:
            request = build_request(port, method, target, fields, content)
            status, response_headers, answer = await exchange(port, request)
    assert status < 500, (status, answer[:300])
    for record in caplog.records:
        assert record.levelno < logging.ERROR, record.getMessage()
        assert record.exc_info is None, record.getMessage()
        message = record.getMessage()
        assert message.splitlines() == [message], message
    content_type = response_headers.get("content-type", "")
    if method == "HEAD":
        return
    if content_type.startswith("application/json"):
        data = strict_json(answer)
        if not 200 <= status < 300:
            assert isinstance(data, dict), data
            assert isinstance(data.get("error"), str), data
            assert "\n" not in data["error"], data
        return
    if 200 <= status < 400:
        return  # pages, static files, probes, metrics, redirects
    assert is_page_request(target, fields), (status, content_type, answer[:300])
    assert content_type.startswith("text/html"), (status, content_type)


SELF = {"Host": "SELF"}
JSON = "application/json"
DRAIN, DRAIN_ALPHA = ("POST", "/api/drain"), ("POST", "/api/services/alpha/drain")
EXTEND, SNAPSHOT = ("POST", "/api/extend-grace"), ("GET", "/api/snapshot")
DEEP = b"[" * 8000 + b"]" * 8000
HUGE_GRACE = b'{"grace": 1' + b"0" * 400 + b"}"
FORGED_LINE = "%0A2026-11-28%2005:11:00,000%20INFO%20nursery_down.audit:%20accepted%0A"

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
# The attacks that once got through run every time; the random examples look for new ones.
@example(method="POST", target=f"/{FORGED_LINE}x", fields=SELF, content=b"")
@example(method="POST", target=f"/api/services/{FORGED_LINE}/drain", fields=SELF, content=b"")
@example(method="POST", target="/api/drain", fields={**SELF, "Origin": "http://[::1"}, content=b"")
@example(method="GET", target=f"/?token={FORGED_LINE}", fields=SELF, content=b"")
@given(
    method=st.sampled_from(["GET", "POST", "POST", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"]),
    target=path,
    fields=headers,
    content=body,
)
async def test_any_request_gets_no_5xx_no_traceback_and_a_json_error(
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    fields: dict[str, str],
    content: bytes,
) -> None:
    await check_one_request(caplog, method, target, fields, content)


#: The requests that read a body or a query, sent as the page or a script would.
reading = st.one_of(
    st.tuples(
        st.just("POST"),
        st.one_of(
            st.sampled_from(["/api/drain", "/api/extend-grace", "/api/restart", "/api/escalate"]),
            st.tuples(st.sampled_from(["alpha", "beta", "gone"]), action).map(
                lambda parts: f"/api/services/{parts[0]}/{parts[1]}"
            ),
        ),
    ),
    st.tuples(st.just("GET"), st.just("/api/snapshot")),
)

#: Bodies a route must read without a 5xx: hostile ones as often as plausible ones.
read_body = st.one_of(
    body,
    st.sampled_from(
        [
            b"[" * 8000 + b"]" * 8000,
            b'{"grace": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"grace": 1' + b"0" * 400 + b"}",
            b'{"seconds": 9' + b"9" * 400 + b', "service": "alpha"}',
            b'{"seconds": 1e308}',
            b'{"grace": 1' + b"0" * 5000 + b"}",
            b"grace=" + b"9" * 5000,
            b"seconds=%C2%B2&service=alpha",
        ]
    ),
)


@FUZZ
# The attacks that once got through run every time; the random examples look for new ones.
@example(request=DRAIN, query="", content_type=JSON, browser=False, content=DEEP)
@example(request=DRAIN_ALPHA, query="", content_type=JSON, browser=True, content=DEEP)
@example(request=DRAIN, query="", content_type=JSON, browser=False, content=HUGE_GRACE)
@example(request=EXTEND, query="", content_type=JSON, browser=False, content=b'{"seconds": 1e308}')
@example(request=SNAPSHOT, query="max_jobs=%C2%B2", content_type="", browser=False, content=b"")
@example(
    request=SNAPSHOT, query=f"max_jobs={'1' * 5000}", content_type="", browser=False, content=b""
)
@given(
    request=reading,
    query=query,
    content_type=st.sampled_from(
        ["application/json", "application/x-www-form-urlencoded", "multipart/form-data", ""]
    ),
    browser=st.booleans(),
    content=read_body,
)
async def test_bodies_and_queries_get_no_5xx_no_traceback_and_a_json_error(
    caplog: pytest.LogCaptureFixture,
    request: tuple[str, str],
    query: str,
    content_type: str,
    browser: bool,
    content: bytes,
) -> None:
    method, route = request
    fields = {"Host": "SELF", "Authorization": f"Bearer {TOKEN}"}
    if browser:  # what the page's own fetch sends
        fields.update({"Origin": "SELF", "Sec-Fetch-Site": "same-origin"})
    if content_type:
        fields["Content-Type"] = content_type
    target = f"{route}?{query}" if query else route
    await check_one_request(caplog, method, target, fields, content)
