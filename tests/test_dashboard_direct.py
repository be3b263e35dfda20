"""``GET /api/snapshot`` answered before the app: only plain, valid requests, the same answer.

The unit tests wrap a spy app with the real admission wrapper and the real snapshot
answer of a real dashboard app, and check which requests reach the app. The end-to-end
test compares the direct answer with the app's over real hypercorn.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

import nursery_down as nd
from tests.dashboard_helpers import create_app, serve_dashboard

if TYPE_CHECKING:
    from dashboard._admission import admit_requests
    from dashboard._api import snapshot_answer
    from dashboard._context import DashboardContext, dashboard_context
else:
    from nursery_down.dashboard._admission import admit_requests
    from nursery_down.dashboard._api import snapshot_answer
    from nursery_down.dashboard._context import DashboardContext, dashboard_context

TOKEN = "direct-test-token-4c1a"
HOST = "127.0.0.1:8080"
LIMIT = 10.0


def make_supervisor(jobs: int = 2, name: str = "direct") -> nd.Supervisor:
    """One service, ``alpha``, holding *jobs* in-flight jobs ``a-0``, ``a-1``... for ever."""
    sup = nd.Supervisor(name=name, grace=30.0)

    async def hold(ctx: nd.ServiceContext, key: str) -> None:
        async with ctx.job(key, topic="orders"):
            await trio.sleep_forever()

    @sup.service
    async def alpha(ctx: nd.ServiceContext) -> None:
        async with trio.open_nursery() as nursery:
            for number in range(jobs):
                nursery.start_soon(hold, ctx, f"a-{number}")
            ctx.ready()

    return sup


class SpyApp:
    """An ASGI app that answers 299 and notes each path that reached it."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def scope(
    *,
    method: str = "GET",
    path: str = "/api/snapshot",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] = ("10.0.0.7", 5000),
) -> dict[str, Any]:
    if headers is None:
        headers = [(b"host", HOST.encode()), (b"authorization", f"Bearer {TOKEN}".encode())]
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": headers,
        "client": client,
    }


async def call(context: DashboardContext, request: dict[str, Any]) -> tuple[int, bytes, SpyApp]:
    spy = SpyApp()
    admitted: Any = admit_requests(spy, {}, direct=snapshot_answer(context))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await admitted(request, receive, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:]), spy


@pytest.fixture
def context() -> DashboardContext:
    app = create_app(make_supervisor(), token=TOKEN, allowed_hosts=[HOST])
    return dashboard_context(app)


async def test_a_plain_snapshot_request_is_answered_without_the_app(
    context: DashboardContext,
) -> None:
    status, body, spy = await call(context, scope())
    assert (status, spy.reached) == (200, [])
    assert json.loads(body)["app"] == "direct"
    status, body, spy = await call(context, scope(query=b"max_jobs=all"))
    assert (status, spy.reached) == (200, [])
    status, body, spy = await call(context, scope(query=b"max_jobs=0"))
    assert (status, spy.reached) == (200, [])


BEARER = (b"authorization", f"Bearer {TOKEN}".encode())
RIGHT_HOST = (b"host", HOST.encode())

#: Requests the app must handle itself: each gets its errors, counting or cookies there.
FOR_THE_APP: dict[str, dict[str, Any]] = {
    "another path": {"path": "/api/snapshot/"},
    "a HEAD request": {"method": "HEAD"},
    "a POST": {"method": "POST"},
    "no token": {"headers": [RIGHT_HOST]},
    "a wrong token": {"headers": [RIGHT_HOST, (b"authorization", b"Bearer nope")]},
    "a session cookie instead": {"headers": [RIGHT_HOST, (b"cookie", b"nursery_down_x=y")]},
    "no Host": {"headers": [BEARER]},
    "an unknown Host": {"headers": [(b"host", b"evil.example"), BEARER]},
    "two Host headers": {"headers": [RIGHT_HOST, (b"host", b"evil.example"), BEARER]},
    "two tokens": {"headers": [RIGHT_HOST, BEARER, (b"authorization", b"Bearer nope")]},
    "a bad max_jobs": {"query": b"max_jobs=x"},
    "a huge max_jobs": {"query": b"max_jobs=" + b"9" * 5000},
    "an encoded max_jobs": {"query": b"max_jobs=%35"},
    "two max_jobs": {"query": b"max_jobs=1&max_jobs=2"},
    "another parameter": {"query": b"token=abc"},
    "a bare parameter": {"query": b"max_jobs"},
}


@pytest.mark.parametrize("case", sorted(FOR_THE_APP))
async def test_anything_but_a_plain_valid_request_goes_to_the_app(
    context: DashboardContext, case: str
) -> None:
    status, _body, spy = await call(context, scope(**FOR_THE_APP[case]))
    assert (status, spy.reached) == (299, [FOR_THE_APP[case].get("path", "/api/snapshot")])


async def test_a_throttled_address_goes_to_the_app_even_with_the_right_token(
    context: DashboardContext,
) -> None:
    for _ in range(20):
        context.guard.failed_attempts.failed("10.0.0.7")
    status, _body, spy = await call(context, scope())
    assert (status, spy.reached) == (299, ["/api/snapshot"])
    status, _body, spy = await call(context, scope(client=("10.0.0.8", 5000)))
    assert (status, spy.reached) == (200, [])


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[tuple[nd.Supervisor, httpx.AsyncClient]]:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=info.url, timeout=LIMIT, headers=headers) as client:
        yield sup, client
    with trio.fail_after(LIMIT):
        await sup.escalate()
        await sup.wait_finished()


async def test_the_direct_answer_is_the_apps_answer(
    served: tuple[nd.Supervisor, httpx.AsyncClient],
) -> None:
    _sup, client = served
    with trio.fail_after(LIMIT):
        direct = await client.get("/api/snapshot", params={"max_jobs": "1"})
        # Percent-encoded, the same request is the app's to answer.
        by_app = await client.get("/api/snapshot?max_jobs=%31")
    assert direct.status_code == by_app.status_code == 200
    ignored = {"date", "content-length"}
    assert [(k, v) for k, v in direct.headers.items() if k not in ignored] == [
        (k, v) for k, v in by_app.headers.items() if k not in ignored
    ]
    first, second = direct.json(), by_app.json()
    for snapshot in (first, second):
        for service in snapshot["services"]:
            service.pop("oldest_job_age")
            for job in service["jobs"]:
                job.pop("age")
    assert first == second
    assert first["services"][0]["jobs_hidden"] == 1


async def test_a_snapshot_that_fails_is_left_to_the_app_and_its_error_handling(
    context: DashboardContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> dict[str, Any]:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(context.supervisor, "snapshot", broken)
    status, _body, spy = await call(context, scope())
    assert (status, spy.reached) == (299, ["/api/snapshot"])
