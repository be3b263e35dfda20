"""Admission: how much of the event loop the dashboard may take from the services.

The dashboard shares the trio loop with the jobs. A scheduler batch runs every task
that became runnable, so a hundred requests in flight make every batch a hundred
requests long, and each step of a job (wake up, ack, take the next one) waits a whole
batch: a flood of requests on ``/livez`` took short jobs from 870/s to 15/s. Here at
most :data:`RUNNING_LIMIT` requests run at once, at most :data:`WAITING_LIMIT` more
wait (parked, they cost nothing), and any request beyond is answered ``503`` with a
JSON error and ``Retry-After`` at once instead of queuing without bound.

``GET /livez`` is answered here, before the app: answering at all is what it reports
(the loop is alive), so it needs no pass through the framework. So is a plain
``GET /api/snapshot`` (see :func:`~._api.snapshot_answer`), the API's most frequent
call, after the same checks the app makes; any other request goes to the app.
Event streams (``/api/events``) live as long as a page is open: they are not counted.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from ._responses import encode_json

#: Requests handled at once; more wait for a free place.
RUNNING_LIMIT = 4
#: Requests allowed to wait for a place; more are answered 503 at once.
WAITING_LIMIT = 256
#: Seconds a refused client is told to wait (``Retry-After``).
RETRY_AFTER = 1
#: Paths that stay open as long as the client wants: not counted.
STREAM_PATHS = frozenset({"/api/events"})
#: Answered without the app: ``GET /livez``.
LIVENESS_PATH = "/livez"


def admit_requests(
    app: ASGIFramework,
    headers: dict[str, str],
    *,
    running: int = RUNNING_LIMIT,
    waiting: int = WAITING_LIMIT,
    direct: Callable[[HTTPScope], bytes | None] | None = None,
) -> ASGIFramework:
    """Wrap *app* so that at most *running* HTTP requests run at once.

    Up to *waiting* more wait for a place; beyond that a request is answered
    ``503 {"error": ...}`` with ``Retry-After``. ``GET``/``HEAD /livez`` is answered
    directly, and so is a request for which ``direct(scope)`` returns a JSON body.
    *headers* are added to every response given here (the app's security headers).
    """
    places = trio.Semaphore(running)
    queued = 0
    extra = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    extra.append((b"cache-control", b"no-store"))

    async def respond(send: ASGISendCallable, status: int, body: bytes, kind: bytes) -> None:
        response_headers = [
            (b"content-type", kind),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ]
        if status == 503:
            response_headers.append((b"retry-after", str(RETRY_AFTER).encode()))
        with trio.CancelScope(shield=True):
            await send(
                {"type": "http.response.start", "status": status, "headers": response_headers}
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def admitted_app(
        scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        nonlocal queued
        if scope["type"] != "http" or scope["path"] in STREAM_PATHS:
            await app(scope, receive, send)
            return
        try:
            # A free place is taken at once: only a request that has to wait counts
            # as waiting (a burst in one instant would otherwise count its first ones
            # twice, as running and as waiting, until they resume).
            places.acquire_nowait()
        except trio.WouldBlock:
            if queued >= waiting:
                busy = f"the dashboard is busy: try again in {RETRY_AFTER} s"
                await respond(send, 503, encode_json({"error": busy}).encode(), b"application/json")
                return
            queued += 1
            try:
                await places.acquire()
            finally:
                queued -= 1
        try:
            if scope["path"] == LIVENESS_PATH and scope["method"] in ("GET", "HEAD"):
                body = b"ok\n" if scope["method"] == "GET" else b""
                await respond(send, 200, body, b"text/plain; charset=utf-8")
            elif direct is not None and (answer := direct(scope)) is not None:
                await respond(send, 200, answer, b"application/json")
            else:
                await app(scope, receive, send)
        finally:
            places.release()

    return admitted_app
