"""Routes of the dashboard app, served by real hypercorn on a 127.0.0.1 socket.

Each test runs a small supervisor and ``serve_dashboard`` in the test's nursery and
talks to it with httpx over the loopback interface, with the real clock; the one test
that measures time uses a clock that stands still instead.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import nursery_down as nd
from tests.dashboard_helpers import (
    DashboardInfo,
    create_app,
    in_flight_summary,
    request_bytes,
    serve_dashboard,
)

TOKEN = "route-test-token-9d2e"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
#: Bound on every test: they all finish in well under a second.
LIMIT = 10.0


def make_supervisor() -> nd.Supervisor:
    """``alpha`` holds one job until it is hard-cancelled; ``beta`` takes no jobs."""
    sup = nd.Supervisor(name="routes", grace=30.0)

    @sup.service
    async def alpha(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("a-1", topic="orders"):
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
    def host(self) -> str:
        return self.info.url.removeprefix("http://")


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
    message: str = response.json()["error"]
    return message


# -- probes, reading, signing in -------------------------------------------------------


async def test_probes_answer_without_token_or_known_host(served: Served) -> None:
    with trio.fail_after(LIMIT):
        live = await served.client.get("/livez", headers={"Host": "10.1.2.3:9000"})
        ready = await served.client.get("/readyz", headers={"Host": "10.1.2.3:9000"})
    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "state": "running", "reasons": []}


async def test_readyz_is_503_while_a_service_is_drained_and_while_the_app_drains(
    served: Served,
) -> None:
    with trio.fail_after(LIMIT):
        await served.sup.drain("beta")
        await served.sup.wait_state("beta", nd.ServiceState.STOPPED)
        one = await served.client.get("/readyz")
        alpha = await served.client.get("/readyz?service=alpha")
        beta = await served.client.get("/readyz?service=beta")
        unknown = await served.client.get("/readyz?service=gamma")
        await served.sup.drain(grace=10)
        response = await served.client.get("/readyz")
    assert (one.status_code, one.json()) == (
        503,
        {"ready": False, "state": "running", "reasons": ["service beta is stopped"]},
    )
    assert (alpha.status_code, alpha.json()["ready"]) == (200, True)
    assert (beta.status_code, beta.json()["reasons"]) == (503, ["service beta is stopped"])
    assert unknown.status_code == 404
    assert "unknown service 'gamma'" in unknown.json()["error"]
    assert response.status_code == 503
    assert response.json()["state"] == "draining"
    assert response.json()["reasons"][0] == "the app is draining"


async def test_readyz_is_503_before_the_supervisor_runs() -> None:
    app = create_app(make_supervisor(), token=TOKEN, allowed_hosts=["localhost"])
    with trio.fail_after(LIMIT):
        response = await app.test_client().get("/readyz")
    assert response.status_code == 503


async def test_reads_need_the_token(served: Served) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        for path in ("/api/snapshot", "/api/events", "/metrics"):
            missing = await client.get(path)
            wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
            assert missing.status_code == wrong.status_code == 401, path
            assert "Bearer" in missing.headers["www-authenticate"]
            assert "operator token" in error_of(missing)
        page = await client.get("/")
    assert page.status_code == 401
    assert "needs its operator token" in page.text


async def test_token_url_sets_a_strict_session_cookie_and_drops_the_token(
    served: Served,
) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        bad = await client.get("/", params={"token": "nope"})
        signed_in = await client.get("/", params={"token": TOKEN})
        page = await client.get("/")
    assert bad.status_code == 401
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    # The page works without JavaScript: the first snapshot is rendered on the server.
    assert page.status_code == 200
    assert 'data-service="alpha" data-state="running"' in page.text
    assert "a-1" in page.text
    assert "1 job in flight" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_login_form_signs_in(served: Served) -> None:
    with trio.fail_after(LIMIT):
        wrong = await served.client.post("/login", data={"token": "nope"})
        right = await served.client.post("/login", data={"token": TOKEN})
        snapshot = await served.client.get("/api/snapshot")
    assert wrong.status_code == 401
    assert right.status_code == 303
    assert snapshot.status_code == 200


async def test_snapshot_has_the_documented_shape(served: Served) -> None:
    with trio.fail_after(LIMIT):
        response = await served.client.get("/api/snapshot", headers=BEARER)
        capped = await served.client.get("/api/snapshot?max_jobs=0", headers=BEARER)
        bad = await served.client.get("/api/snapshot?max_jobs=lots", headers=BEARER)
    snapshot = response.json()
    assert {"app", "pid", "state", "draining", "grace_deadline", "exit_code", "services"} <= set(
        snapshot
    )
    alpha = snapshot["services"][0]
    assert alpha["name"] == "alpha"
    assert alpha["in_flight"] == 1
    assert alpha["jobs"][0]["key"] == "a-1"
    assert alpha["jobs"][0]["info"] == {"topic": "orders"}
    assert capped.json()["services"][0]["jobs_hidden"] == 1
    assert bad.status_code == 400
    assert "max_jobs" in error_of(bad)


async def test_metrics_are_prometheus_text_per_service(served: Served) -> None:
    with trio.fail_after(LIMIT):
        await served.sup.drain("beta")
        await served.sup.wait_state("beta", nd.ServiceState.STOPPED)
        response = await served.client.get("/metrics", headers=BEARER)
    text = response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert 'nursery_down_service_in_flight{app="routes",service="alpha"} 1.0' in text
    assert 'nursery_down_service_state{app="routes",service="beta",state="stopped"} 1.0' in text
    assert 'nursery_down_jobs_completed_total{app="routes",service="alpha"} 0.0' in text
    assert "nursery_down_jobs_hard_cancelled_total" in text
    assert "nursery_down_service_restarts_total" in text
    assert 'nursery_down_service_drain_duration_seconds{app="routes",service="beta"}' in text


# -- actions ---------------------------------------------------------------------------


async def test_service_actions_answer_202_with_the_new_snapshot(served: Served) -> None:
    client, sup = served.client, served.sup
    with trio.fail_after(LIMIT):
        drained = await client.post("/api/services/beta/drain", json={"grace": 5}, headers=BEARER)
        assert drained.status_code == 202
        assert drained.json()["services"][1]["state"] in ("draining", "stopped")
        await sup.wait_state("beta", nd.ServiceState.STOPPED)
        started = await client.post("/api/services/beta/start", headers=BEARER)
        assert started.status_code == 202
        await sup.wait_state("beta", nd.ServiceState.RUNNING)
        restarted = await client.post("/api/services/beta/restart", headers=BEARER)
        assert restarted.status_code == 202
        await sup.wait_state("beta", nd.ServiceState.RUNNING)
        escalated = await client.post("/api/services/alpha/escalate", headers=BEARER)
        assert escalated.status_code == 202
        await sup.wait_state("alpha", nd.ServiceState.STOPPED)
    assert sup.snapshot()["services"][0]["hard_cancelled"] == 1
    actions = [e.detail.get("action") for e in sup.events() if e.kind == "action"]
    assert actions == ["drain", "start", "restart", "escalate"]
    actors = {e.detail["actor"] for e in sup.events() if e.kind == "action"}
    assert actors == {"api 127.0.0.1"}


async def test_whole_app_drain_and_extend_grace(served: Served) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        not_draining = await client.post("/api/extend-grace", json={"seconds": 5}, headers=BEARER)
        drained = await client.post("/api/drain", data={"grace": "20"}, headers=BEARER)
        extended = await client.post(
            "/api/extend-grace", json={"seconds": 30, "service": "alpha"}, headers=BEARER
        )
    assert not_draining.status_code == 409
    assert "drain it first" in error_of(not_draining)
    assert drained.status_code == 202
    assert drained.json()["state"] == "draining"
    assert extended.status_code == 202
    alpha = extended.json()["services"][0]
    assert alpha["state"] == "draining"
    assert 45 < alpha["jobs"][0]["time_left"] <= 50


async def test_whole_app_escalate_drains_the_app_and_hard_cancels_its_jobs(
    served: Served,
) -> None:
    sup = served.sup
    with trio.fail_after(LIMIT):
        escalated = await served.client.post("/api/escalate", headers=BEARER)
        assert escalated.status_code == 202
        assert escalated.json()["state"] in ("draining", "stopped")
        await sup.wait_finished()
    assert sup.app_state == "stopped"
    assert [s["state"] for s in sup.snapshot()["services"]] == ["stopped", "stopped"]
    assert sup.snapshot()["services"][0]["hard_cancelled"] == 1
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED
    [report] = sup.drain_reports()
    assert (report["scope"], report["action"], report["actor"]) == (
        "app",
        "escalate",
        "api 127.0.0.1",
    )


async def test_unknown_service_is_404_json(served: Served) -> None:
    with trio.fail_after(LIMIT):
        response = await served.client.post("/api/services/gamma/drain", headers=BEARER)
        no_action = await served.client.post("/api/services/alpha/explode", headers=BEARER)
        extend = await served.client.post(
            "/api/extend-grace", json={"seconds": 1, "service": "gamma"}, headers=BEARER
        )
    assert response.status_code == 404
    assert error_of(response) == "unknown service 'gamma'; known services: 'alpha', 'beta'"
    assert no_action.status_code == 404
    assert "/api/services/<name>/{drain,start,restart,escalate}" in error_of(no_action)
    assert extend.status_code == 404


async def test_actions_are_post_only(served: Served) -> None:
    with trio.fail_after(LIMIT):
        for path in ("/api/drain", "/api/services/alpha/drain", "/api/extend-grace"):
            response = await served.client.get(path, headers=BEARER)
            assert response.status_code == 405, path
            assert set(response.headers["allow"].split(", ")) == {"OPTIONS", "POST"}
            assert "GET is not allowed" in error_of(response)
    assert served.sup.state_of("alpha") is nd.ServiceState.RUNNING


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
        (b"[1, 2]", {"Content-Type": "application/json"}, "must be a JSON object"),
        (b'{"grace": "soon"}', {"Content-Type": "application/json"}, "number of seconds"),
        (b'{"grace": true}', {"Content-Type": "application/json"}, "number of seconds"),
        (b'{"grace": -1}', {"Content-Type": "application/json"}, ">= 0"),
        (b"grace=NaN", {"Content-Type": "application/x-www-form-urlencoded"}, "finite"),
        (b"grace=10", {"Content-Type": "text/plain"}, "Content-Type: application/json"),
    ],
)
async def test_bad_bodies_are_400_json(
    served: Served, body: bytes, headers: dict[str, str], expected: str
) -> None:
    with trio.fail_after(LIMIT):
        response = await served.client.post(
            "/api/services/alpha/drain", content=body, headers={**BEARER, **headers}
        )
    assert response.status_code == 400
    assert expected in error_of(response)
    assert served.sup.state_of("alpha") is nd.ServiceState.RUNNING


async def test_extend_grace_needs_seconds(served: Served) -> None:
    with trio.fail_after(LIMIT):
        missing = await served.client.post("/api/extend-grace", json={}, headers=BEARER)
        bad_service = await served.client.post(
            "/api/extend-grace", json={"seconds": 3, "service": 7}, headers=BEARER
        )
    assert missing.status_code == 400
    assert "'seconds' is required" in error_of(missing)
    assert bad_service.status_code == 400


async def test_actions_need_the_token(served: Served) -> None:
    with trio.fail_after(LIMIT):
        response = await served.client.post("/api/drain")
        wrong = await served.client.post(
            "/api/services/alpha/drain", headers={"Authorization": f"Bearer {TOKEN}x"}
        )
    assert response.status_code == wrong.status_code == 401
    assert served.sup.state_of("alpha") is nd.ServiceState.RUNNING


# -- cross-site requests and DNS rebinding ---------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
async def test_cross_site_posts_are_refused(served: Served, headers: dict[str, str]) -> None:
    with trio.fail_after(LIMIT):
        await served.client.get("/", params={"token": TOKEN})  # a signed-in browser
        response = await served.client.post("/api/services/alpha/drain", headers=headers)
    assert response.status_code == 403
    assert "refused" in error_of(response)
    assert served.sup.state_of("alpha") is nd.ServiceState.RUNNING


async def test_same_origin_posts_from_the_page_are_accepted(served: Served) -> None:
    headers = {"Origin": served.info.url, "Sec-Fetch-Site": "same-origin"}
    with trio.fail_after(LIMIT):
        await served.client.get("/", params={"token": TOKEN})
        response = await served.client.post("/api/services/beta/drain", headers=headers)
    assert response.status_code == 202
    actors = [e.detail["actor"] for e in served.sup.events() if e.kind == "action"]
    assert actors == ["browser 127.0.0.1"]


async def test_plain_form_post_redirects_back_to_the_page(served: Served) -> None:
    # What a browser without JavaScript sends.
    headers = {
        "Accept": "text/html,application/xhtml+xml",
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": served.info.url,
    }
    with trio.fail_after(LIMIT):
        await served.client.get("/", params={"token": TOKEN})
        done = await served.client.post("/api/services/alpha/drain", content=b"", headers=headers)
        refused = await served.client.post(
            "/api/services/alpha/start", content=b"", headers=headers
        )
    assert done.status_code == 303
    assert done.headers["location"] == "/"
    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith("text/html")
    assert "cannot start" in refused.text


async def test_unknown_host_is_refused(served: Served) -> None:
    with trio.fail_after(LIMIT):
        rebound = await served.client.get(
            "/api/snapshot", headers={**BEARER, "Host": f"evil.example:{served.info.url[-5:]}"}
        )
        localhost = await served.client.get(
            "/api/snapshot",
            headers={**BEARER, "Host": served.host.replace("127.0.0.1", "localhost")},
        )
    assert rebound.status_code == 421
    assert "does not answer to the name" in error_of(rebound)
    assert localhost.status_code == 200


async def test_request_without_host_is_400(served: Served) -> None:
    port = int(served.info.url.rsplit(":", 1)[1])
    request = f"GET /api/snapshot HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    with trio.fail_after(LIMIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    assert b"no Host header" in data


async def test_allowed_hosts_add_names(nursery: trio.Nursery) -> None:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(
            partial(
                serve_dashboard, sup, "127.0.0.1:0", token=TOKEN, allowed_hosts=["ops.example.com"]
            )
        )
        async with httpx.AsyncClient(base_url=info.url, headers=BEARER) as client:
            bare = await client.get("/api/snapshot", headers={"Host": "ops.example.com"})
            other = await client.get("/api/snapshot", headers={"Host": "ops.example.org"})
        # Jobs are shielded: the supervisor must finish before the test's nursery ends.
        await sup.escalate()
        await sup.wait_finished()
    assert bare.status_code == 200
    assert other.status_code == 421


# -- event stream and shutdown ----------------------------------------------------------


async def read_messages(
    stream: trio.SocketStream, buffer: bytearray
) -> list[tuple[str, dict[str, Any]]]:
    """Whatever complete SSE messages arrived next (chunk framing stripped loosely)."""
    while b"\n\n" not in buffer:
        buffer.extend(await stream.receive_some())
    text, _, rest = bytes(buffer).rpartition(b"\n\n")
    buffer[:] = rest
    messages = []
    for block in text.decode().split("\n\n"):
        name = next((ln[7:] for ln in block.splitlines() if ln.startswith("event: ")), None)
        data = [ln[6:] for ln in block.splitlines() if ln.startswith("data: ")]
        if name:
            messages.append((name, json.loads("".join(data))))
    return messages


async def test_event_stream_starts_with_a_snapshot_then_sends_deltas(served: Served) -> None:
    port = int(served.info.url.rsplit(":", 1)[1])
    with trio.fail_after(LIMIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request_bytes(port, "GET", "/api/events", token=TOKEN))
            buffer = bytearray()
            first = await read_messages(stream, buffer)
            assert first[0][0] == "snapshot"
            assert first[0][1]["services"][0]["jobs"][0]["key"] == "a-1"
            assert first[0][1]["events"][-1]["message"] == "every service started"
            await served.sup.drain("beta", actor="test")
            seen: list[tuple[str, dict[str, Any]]] = []
            while not any(d.get("state") == "stopped" for _, d in seen):
                seen += await read_messages(stream, buffer)
    deltas = [(d["service"], d["state"]) for n, d in seen if n == "event" and d["kind"] == "state"]
    assert deltas == [("beta", "draining"), ("beta", "stopped")]
    assert seen[0][1]["message"] == "drain service beta (by test)"


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """A clock that stands still: a wait on a timeout can only end by a jump, made
    once every task has been blocked for 5 real seconds (instead of hanging)."""
    return trio.testing.MockClock(rate=0, autojump_threshold=5.0)


async def test_dashboard_returns_promptly_once_the_supervisor_stopped(
    nursery: trio.Nursery, frozen_clock: trio.testing.MockClock
) -> None:
    sup = make_supervisor()
    ended = trio.Event()

    async def dashboard(*, task_status: trio.TaskStatus[DashboardInfo]) -> None:
        await serve_dashboard(sup, "127.0.0.1:0", token=TOKEN, task_status=task_status)
        ended.set()

    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(dashboard)
        port = int(info.url.rsplit(":", 1)[1])
        # Three open event streams and one idle keep-alive connection.
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        for stream in streams[:3]:
            await stream.send_all(request_bytes(port, "GET", "/api/events", token=TOKEN))
            await read_messages(stream, bytearray())
        await streams[3].send_all(request_bytes(port, "GET", "/livez"))
        assert (await streams[3].receive_some()).startswith(b"HTTP/1.1 200")
        await sup.escalate()
        await sup.wait_finished()
        stopped_at = trio.current_time()
        await ended.wait()
        took = trio.current_time() - stopped_at
        for stream in streams:
            await stream.aclose()
    # On the frozen clock: 0 unless the dashboard waited out a timeout (the 0.5 s for
    # the event streams, hypercorn's 2 s graceful timeout), whatever the machine's speed.
    assert took < 0.5, f"the dashboard took {took:.3f} s to end"


# -- configuration errors ---------------------------------------------------------------


async def test_bad_addresses_are_configuration_errors() -> None:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        for address in ("nonsense", "127.0.0.1:99999", "[::1:80", "127.0.0.1:-1"):
            with pytest.raises(nd.ConfigurationError, match="bad dashboard address"):
                await serve_dashboard(sup, address)


async def test_non_loopback_host_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NURSERY_DOWN_TOKEN", raising=False)
    with trio.fail_after(LIMIT), pytest.raises(nd.ConfigurationError, match="NURSERY_DOWN_TOKEN"):
        await serve_dashboard(make_supervisor(), "0.0.0.0:0")


async def test_port_in_use_is_one_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(LIMIT), pytest.raises(nd.ConfigurationError, match="already in use"):
            await serve_dashboard(make_supervisor(), f"127.0.0.1:{port}")


# -- audit and texts ----------------------------------------------------------------------


async def test_every_action_is_audited_without_the_token(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down.audit")
    with trio.fail_after(LIMIT):
        await served.client.post("/api/services/beta/drain", headers=BEARER)
        await served.client.post("/api/services/gamma/drain", headers=BEARER)
        await served.client.post("/api/drain", headers={"Origin": "http://evil.example"})
    records = [r.getMessage() for r in caplog.records if r.name == "nursery_down.audit"]
    assert records[0] == "drain service beta by api 127.0.0.1: accepted"
    assert records[1].startswith("drain service gamma by api 127.0.0.1: refused 404")
    assert records[2].startswith("POST /api/drain by unknown 127.0.0.1: refused 403")
    assert all(TOKEN not in record for record in records)


def test_impact_line_counts_jobs_that_will_exceed_the_grace() -> None:
    jobs = [{"age": 42.0}, {"age": 35.0}, {"age": 3.0}]
    assert in_flight_summary(7, jobs, 30.0) == (
        "7 jobs in flight, oldest 42 s; 2 will exceed the 30 s grace"
    )
    assert in_flight_summary(1, [{"age": 3.0}], 30.0) == "1 job in flight, oldest 3.0 s; grace 30 s"
    assert in_flight_summary(900, [{"age": 99.0}] * 50, 30.0).endswith(
        "50+ will exceed the 30 s grace"
    )
    assert in_flight_summary(0, [], 30.0) == "no jobs in flight"
