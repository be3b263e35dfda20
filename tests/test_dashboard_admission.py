"""The dashboard's admission limits: a cap on running requests, a bounded wait, 503 beyond."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

if TYPE_CHECKING:
    from dashboard._admission import admit_requests
else:
    from nursery_down.dashboard._admission import admit_requests

HEADERS = {"X-Frame-Options": "DENY"}


def admit(app: Any, *, running: int, waiting: int) -> Any:
    return admit_requests(app, HEADERS, running=running, waiting=waiting)


def http_scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "path": path, "method": method, "headers": []}


class Recorder:
    """An ASGI ``send`` that keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.finished = trio.Event()

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.finished.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def blocking_app() -> tuple[Any, trio.Event, list[str]]:
    """An app whose requests wait for *release*; *entered* lists the paths that ran."""
    release = trio.Event()
    entered: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        entered.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    return app, release, entered


async def test_requests_beyond_running_and_waiting_get_503_with_retry_after() -> None:
    app, release, entered = blocking_app()
    admitted = admit(app, running=1, waiting=1)
    first, second, third = Recorder(), Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admitted, http_scope("/api/snapshot"), receive, first)
            while entered != ["/api/snapshot"]:
                await trio.sleep(0)
            nursery.start_soon(admitted, http_scope("/api/snapshot"), receive, second)
            await trio.testing.wait_all_tasks_blocked()
            # one runs, one waits: the third is refused at once, not queued
            await admitted(http_scope("/api/snapshot"), receive, third)
            assert third.status == 503
            assert third.headers[b"retry-after"] == b"1"
            assert third.headers[b"content-type"] == b"application/json"
            assert third.headers[b"x-frame-options"] == b"DENY"
            assert "busy" in json.loads(third.body)["error"]
            assert entered == ["/api/snapshot"]
            release.set()
            await second.finished.wait()
    assert (first.status, second.status) == (200, 200)
    assert entered == ["/api/snapshot", "/api/snapshot"]


async def test_a_burst_in_one_instant_fills_every_running_and_waiting_place() -> None:
    app, release, entered = blocking_app()
    admitted = admit(app, running=2, waiting=3)
    recorders = [Recorder() for _ in range(6)]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for number, recorder in enumerate(recorders):  # all in one scheduler pass
                nursery.start_soon(admitted, http_scope(f"/r/{number}"), receive, recorder)
            await trio.testing.wait_all_tasks_blocked()
            # 2 run and 3 wait: only the sixth, whichever ran last, is refused.
            assert len(entered) == 2
            assert [recorder.status for recorder in recorders if recorder.messages] == [503]
            release.set()
    assert sorted(recorder.status for recorder in recorders) == [200] * 5 + [503]


async def test_event_streams_are_not_counted() -> None:
    app, release, entered = blocking_app()
    admitted = admit(app, running=1, waiting=0)
    stream, request = Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admitted, http_scope("/api/events"), receive, stream)
            nursery.start_soon(admitted, http_scope("/api/snapshot"), receive, request)
            while len(entered) < 2:
                await trio.sleep(0)
            release.set()
    assert sorted(entered) == ["/api/events", "/api/snapshot"]


async def test_livez_is_answered_without_the_app_and_waits_its_turn() -> None:
    app, release, entered = blocking_app()
    admitted = admit(app, running=1, waiting=1)
    busy, probe, head = Recorder(), Recorder(), Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admitted, http_scope("/api/snapshot"), receive, busy)
            while not entered:
                await trio.sleep(0)
            nursery.start_soon(admitted, http_scope("/livez"), receive, probe)
            await trio.testing.wait_all_tasks_blocked()
            # the probe waits for a place like any request: under a flood it stays cheap
            assert not probe.messages
            release.set()
            await probe.finished.wait()
        await admitted(http_scope("/livez", "HEAD"), receive, head)
    assert entered == ["/api/snapshot"]
    assert (probe.status, probe.body) == (200, b"ok\n")
    assert probe.headers[b"cache-control"] == b"no-store"
    assert (head.status, head.body) == (200, b"")


async def test_a_cancelled_waiter_gives_its_place_in_the_queue_back() -> None:
    app, release, entered = blocking_app()
    admitted = admit(app, running=1, waiting=1)
    later = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admitted, http_scope("/a"), receive, Recorder())
            while not entered:
                await trio.sleep(0)
            async with trio.open_nursery() as gone:
                gone.start_soon(admitted, http_scope("/b"), receive, Recorder())
                await trio.testing.wait_all_tasks_blocked()
                gone.cancel_scope.cancel()  # the client went away while waiting
            nursery.start_soon(admitted, http_scope("/c"), receive, later)
            await trio.testing.wait_all_tasks_blocked()
            assert not later.messages  # waiting, not refused
            release.set()
    assert later.status == 200
    assert entered == ["/a", "/c"]


async def test_by_default_4_requests_run_256_wait_and_the_next_is_refused() -> None:
    app, release, entered = blocking_app()
    admitted: Any = admit_requests(app, HEADERS)  # the defaults
    answered = [Recorder() for _ in range(4 + 256)]
    refused = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for number, recorder in enumerate(answered):
                nursery.start_soon(admitted, http_scope(f"/r/{number}"), receive, recorder)
                await trio.testing.wait_all_tasks_blocked()  # running, or parked waiting
            assert len(entered) == 4
            assert not any(recorder.messages for recorder in answered)
            await admitted(http_scope("/r/refused"), receive, refused)
            assert refused.status == 503
            release.set()
    assert [recorder.status for recorder in answered] == [200] * 260
    assert len(entered) == 260
