"""Hostile and careless input to the dashboard: log lines, JSON, names, numbers, no-ops.

The dashboard runs on real hypercorn in the test's nursery, with the real clock, as in
test_dashboard_routes.py; raw requests go over a trio socket so that nothing between
the test and the server tidies them up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

import nursery_down as nd
from tests.dashboard_helpers import DashboardInfo, request_bytes, serve_dashboard

if TYPE_CHECKING:
    # mypy knows the source folder as "dashboard"; it is installed as nursery_down.dashboard.
    from dashboard._audit import log_safe
    from dashboard._pages import path_segment
else:
    from nursery_down.dashboard._audit import log_safe
    from nursery_down.dashboard._pages import path_segment

TOKEN = "hostile-test-token-5b1f2c"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 10.0

#: Characters that would start a new line, or rewrite one, if written to a log as they are.
LINE_BREAKERS = ("\n", "\r", "\x1b", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029")


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as a browser does: NaN and Infinity are errors."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def make_supervisor() -> nd.Supervisor:
    """``alpha`` holds one job (with a NaN in its info) until cut; ``beta`` takes none."""
    sup = nd.Supervisor(name="hostile", grace=30.0)

    @sup.service
    async def alpha(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job(float("nan"), ratio=float("nan"), rate=float("inf")):
            await trio.sleep_forever()

    @sup.service
    async def beta(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    return sup


@dataclass
class Served:
    sup: nd.Supervisor
    info: DashboardInfo
    client: httpx.AsyncClient

    @property
    def port(self) -> int:
        return int(self.info.url.rsplit(":", 1)[1])

    async def raw(
        self, method: str, path: str, *, token: str | None = None, **headers: str
    ) -> tuple[int, bytes]:
        """One raw HTTP/1.1 request (header values sent as latin-1); (status, body)."""
        fields = {"Host": f"127.0.0.1:{self.port}", "Connection": "close", **headers}
        if token is not None:
            fields["Authorization"] = f"Bearer {token}"
        if method == "POST":
            fields["Content-Length"] = "0"
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[Served]:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
    async with httpx.AsyncClient(base_url=info.url, timeout=LIMIT) as client:
        yield Served(sup, info, client)
    with trio.fail_after(LIMIT):
        if sup.running:
            await sup.escalate()
        await sup.wait_finished()


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    message: str = strict_json(response.text)["error"]
    return message


# -- log lines ------------------------------------------------------------------------------

FORGED = (
    "2026-11-28 05:11:00,000 INFO nursery_down.audit: drain the whole app by browser "
    "10.0.0.66: accepted"
)


@pytest.mark.parametrize(
    "breaker", ["%0A", "%0D", "%1B[2K%0D", "%E2%80%A8", "%C2%85", "%0B", "%E2%80%A9"]
)
async def test_request_data_cannot_write_a_log_line_of_its_own(
    served: Served, caplog: pytest.LogCaptureFixture, breaker: str
) -> None:
    caplog.set_level(logging.DEBUG)
    forged = FORGED.replace(" ", "%20")
    with trio.fail_after(LIMIT):
        # No token: refused 401, audited with the path.
        assert (await served.raw("POST", f"/{breaker}{forged}{breaker}x"))[0] == 401
        # Cross-site: refused 403, audited with the path and the browser's header.
        status, _ = await served.raw(
            "POST",
            f"/api/drain?{breaker}={breaker}",
            token=TOKEN,
            **{"Sec-Fetch-Site": "cross-site\x7f\xe2\x80\xa8", "User-Agent": "x\xc2\x85y"},
        )
        assert status == 403
        # A service name in the path: refused 404, audited with the name.
        status, _ = await served.raw(
            "POST", f"/api/services/gamma{breaker}{forged}/drain", token=TOKEN
        )
        assert status == 404
        # A wrong token in the query: the sign-in refusal is audited.
        assert (await served.raw("GET", f"/?token=x{breaker}{forged}"))[0] == 401
        # A Host of another name: refused 421 (and nothing of it logged as a line).
        status, _ = await served.raw("GET", "/api/snapshot", token=TOKEN, Host="a\xe2\x80\xa8b")
        assert status == 421
    messages = [record.getMessage() for record in caplog.records]
    audit = [r.getMessage() for r in caplog.records if r.name == "nursery_down.audit"]
    assert len(audit) == 4, audit
    for message in messages:
        assert message.splitlines() == [message], message
        assert not any(char in message for char in LINE_BREAKERS), message
    assert any(FORGED in message for message in audit)  # written, but inside one line
    assert all(not message.startswith("2026") for message in messages)


def test_log_safe_escapes_what_would_break_a_line() -> None:
    assert log_safe("a\nb\rc\x1bd\u2028e\x85f") == "a\\nb\\rc\\x1bd\\u2028e\\x85f"
    assert log_safe("back\\slash") == "back\\\\slash"  # an escape in the log is always ours
    assert log_safe("café ok") == "café ok"
    long = log_safe("x" * 1000)
    assert long.endswith("... (700 more characters)")
    assert len(long) < 400


# -- JSON that a browser can read ------------------------------------------------------------


async def test_snapshots_events_and_answers_are_valid_json_with_nan_and_infinity(
    served: Served,
) -> None:
    served.sup.announce("a measurement", ratio=float("nan"), rate=float("-inf"))
    with trio.fail_after(LIMIT):
        snapshot = await served.client.get("/api/snapshot", headers=BEARER)
        drained = await served.client.post("/api/services/beta/drain", headers=BEARER)
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with stream:
            await stream.send_all(request_bytes(served.port, "GET", "/api/events", token=TOKEN))
            data = b""
            while b"\n\n" not in data.partition(b"event: snapshot")[2]:
                data += await stream.receive_some()
    first = data.partition(b"event: snapshot\n")[2].partition(b"\n\n")[0]
    payload = "".join(line.removeprefix("data: ") for line in first.decode().split("\n"))
    from_stream = strict_json(payload)
    for answer in (strict_json(snapshot.text), strict_json(drained.text), from_stream):
        job = answer["services"][0]["jobs"][0]
        assert job["key"] in ("nan", None)
        assert job["info"]["ratio"] in ("nan", None)
    announced = next(e for e in from_stream["events"] if e["message"] == "a measurement")
    assert announced["detail"] == {"ratio": None, "rate": None}


# -- numbers and bodies that used to be 500s ------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/api/services/alpha/drain", b'{"grace": 1' + b"0" * 400 + b"}", "'grace' must be"),
        ("/api/drain", b'{"grace": -1' + b"0" * 400 + b"}", "'grace' must be"),
        (
            "/api/services/alpha/drain",
            b'{"a":' + b"[" * 8000 + b"]" * 8000 + b"}",
            "nests too deeply",
        ),
        ("/api/drain", b"[" * 8000 + b"]" * 8000, "nests too deeply"),
        ("/api/services/beta/drain", b'{"grace": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ],
)
async def test_oversized_numbers_and_deep_json_are_400_and_audited(
    served: Served, caplog: pytest.LogCaptureFixture, path: str, body: bytes, expected: str
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down.audit")
    headers = {**BEARER, "Content-Type": "application/json"}
    with trio.fail_after(LIMIT):
        response = await served.client.post(path, content=body, headers=headers)
    assert response.status_code == 400
    message = error_of(response)
    assert expected in message
    assert len(message) < 300
    audit = [r.getMessage() for r in caplog.records if r.name == "nursery_down.audit"]
    assert len(audit) == 1
    assert "by api 127.0.0.1: refused 400: " in audit[0]
    assert served.sup.app_state == "running"
    assert {s["state"] for s in served.sup.snapshot()["services"]} == {"running"}


async def test_extend_grace_with_a_400_digit_number_is_400(served: Served) -> None:
    with trio.fail_after(LIMIT):
        await served.sup.drain("beta", grace=5)
        response = await served.client.post(
            "/api/extend-grace",
            content=b'{"seconds": 9' + b"9" * 399 + b', "service": "beta"}',
            headers={**BEARER, "Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert "'seconds' must be a number of seconds" in error_of(response)


@pytest.mark.parametrize("max_jobs", ["²", "1" * 5000, "٣", "-1", "1e3", " 1"])
async def test_max_jobs_that_is_not_a_plain_whole_number_is_400(
    served: Served, max_jobs: str
) -> None:
    with trio.fail_after(LIMIT):
        response = await served.client.get(
            "/api/snapshot", params={"max_jobs": max_jobs}, headers=BEARER
        )
    assert response.status_code == 400
    message = error_of(response)
    assert "max_jobs must be a whole number" in message
    assert len(message) < 200


# -- service names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../escalate#",
        "db/primary",
        "<script>alert(1)</script>",
        "café",
        "",
        "x" * 1000,
        "x" * 65,
        ".hidden",
        "-v",
        "a b",
        "a\nb",
        "a%2Fb",
        "a?b",
    ],
)
def test_service_names_that_urls_or_shells_would_misread_are_refused(name: str) -> None:
    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    sup = nd.Supervisor("names")
    with pytest.raises(nd.ConfigurationError) as refused:
        sup.add(service, name=name)
    message = str(refused.value)
    assert "name" in message
    assert "\n" not in message
    assert len(message) < 400
    assert sup.service_names == []


@pytest.mark.parametrize("name", ["db-primary", "db.primary", "_private", "Worker_2", "x" * 64])
def test_plain_service_names_are_accepted(name: str) -> None:
    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    sup = nd.Supervisor("names")
    sup.add(service, name=name)
    assert sup.service_names == [name]


def test_page_addresses_encode_a_service_name_as_one_segment() -> None:
    assert path_segment("db.primary-2") == "db.primary-2"
    assert path_segment("../escalate#") == "..%2Fescalate%23"
    assert path_segment("a b/c?d") == "a%20b%2Fc%3Fd"


# -- drains that change nothing, and caps -----------------------------------------------------


async def test_second_whole_app_drain_tightens_and_says_so(served: Served) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        first = await client.post("/api/drain", json={"grace": 60}, headers=BEARER)
        shorter = await client.post("/api/drain", json={"grace": 10}, headers=BEARER)
        longer = await client.post("/api/drain", json={"grace": 600}, headers=BEARER)
    assert first.status_code == shorter.status_code == longer.status_code == 202
    assert first.json()["outcome"] == "the whole app: the drain began"
    assert "deadline moved" in shorter.json()["outcome"]
    assert "earlier" in shorter.json()["outcome"]
    assert "the deadline stays" in longer.json()["outcome"]
    alpha = longer.json()["services"][0]
    assert alpha["state"] == "draining"
    assert 5 < alpha["jobs"][0]["time_left"] <= 10


async def test_second_service_drain_says_what_happened(served: Served) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        first = await client.post("/api/services/alpha/drain", json={"grace": 60}, headers=BEARER)
        shorter = await client.post("/api/services/alpha/drain", json={"grace": 5}, headers=BEARER)
        longer = await client.post("/api/services/alpha/drain", json={"grace": 600}, headers=BEARER)
    assert first.json()["outcome"] == "service alpha: the drain began"
    assert "moved" in shorter.json()["outcome"]
    assert "the deadline stays" in longer.json()["outcome"]
    assert 0 < longer.json()["services"][0]["jobs"][0]["time_left"] <= 5


@pytest.mark.parametrize("seconds", [1e308, 86_401, "1e308"])
async def test_extend_grace_beyond_a_day_is_400(served: Served, seconds: object) -> None:
    with trio.fail_after(LIMIT):
        await served.sup.drain(grace=10)
        response = await served.client.post(
            "/api/extend-grace", json={"seconds": seconds}, headers=BEARER
        )
        snapshot = await served.client.get("/api/snapshot", headers=BEARER)
    assert response.status_code == 400
    assert "at most 86400 s (a day) per call" in error_of(response)
    deadline = strict_json(snapshot.text)["grace_deadline"]
    assert deadline is not None


async def test_extend_grace_stops_a_week_ahead(served: Served) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        await served.sup.drain(grace=10)
        answers = [
            await client.post("/api/extend-grace", json={"seconds": 86_400}, headers=BEARER)
            for _ in range(8)
        ]
    assert [a.status_code for a in answers] == [202] * 6 + [400, 400]
    assert "at most 604800 s (a week) from now" in error_of(answers[6])
    alpha = answers[5].json()["services"][0]
    assert 6 * 86_400 < alpha["jobs"][0]["time_left"] <= 6 * 86_400 + 10


async def test_drain_or_escalate_of_a_stopped_service_is_409_but_a_no_op_in_python(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down.audit")
    sup = served.sup
    with trio.fail_after(LIMIT):
        await sup.drain("beta")
        await sup.wait_state("beta", nd.ServiceState.STOPPED)
        drained = await served.client.post("/api/services/beta/drain", headers=BEARER)
        escalated = await served.client.post("/api/services/beta/escalate", headers=BEARER)
        # The Python API keeps its promise: control methods are idempotent.
        await sup.drain("beta")
        await sup.escalate("beta")
    assert drained.status_code == escalated.status_code == 409
    assert error_of(drained) == "nothing to drain: service 'beta' is stopped; start it first"
    assert "nothing to escalate" in error_of(escalated)
    assert sup.state_of("beta") is nd.ServiceState.STOPPED
    audit = [r.getMessage() for r in caplog.records if r.name == "nursery_down.audit"]
    assert audit[0].startswith("drain service beta by api 127.0.0.1: refused 409")


async def test_drain_of_a_failed_service_is_409(nursery: trio.Nursery) -> None:
    sup = nd.Supervisor("failing", max_restarts=0)

    @sup.service(restart="transient")
    async def broken(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        raise RuntimeError("gone")

    @sup.service
    async def steady(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
        await sup.wait_state("broken", nd.ServiceState.FAILED)
        async with httpx.AsyncClient(base_url=info.url) as client:
            response = await client.post("/api/services/broken/drain", headers=BEARER)
        await sup.drain()
        await sup.wait_finished()
    assert response.status_code == 409
    assert error_of(response) == (
        "nothing to drain: service 'broken' is failed; start it again first"
    )
