"""An HTTP API served by hypercorn as a supervised service, drained without dropping requests.

Each request runs as an in-flight job: counted, shown on the dashboard, shielded.
When a drain begins, readiness turns 503 first; after HTTP_PRE_DRAIN seconds (time
for a load balancer to take the instance out of rotation; default 0) the server stops
accepting connections, and the requests in flight finish (until the grace deadline).
A request that arrives after the drain began gets 503 with ``Connection: close`` and
``Retry-After``, so the client retries elsewhere: no new work starts during a drain.

    python examples/http_service.py                  # then: curl 127.0.0.1:8000/work?seconds=2
    HTTP_ADDRESS=127.0.0.1:0 HTTP_DASHBOARD=127.0.0.1:8080 python examples/http_service.py
    kill -USR2 <pid>                                 # upgrade: the new code takes the socket

An upgrade runs the program again; the new generation inherits the listening socket
(``nd.listener``), and once it is ready this one drains: no connection is refused.

Needs the dashboard extra (quart-trio, hypercorn): pip install 'nursery-down[dashboard]'.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)
from quart import request
from quart_trio import QuartTrio

import nursery_down as nd
from nursery_down.dashboard import shield_sends

ADDRESS = os.environ.get("HTTP_ADDRESS", "127.0.0.1:8000")
GRACE = float(os.environ.get("HTTP_GRACE", "10"))
PRE_DRAIN = float(os.environ.get("HTTP_PRE_DRAIN", "0"))

app = QuartTrio(__name__)
readiness = {"ready": False}


@app.get("/work")
async def work() -> dict[str, float]:
    """Pretend to work for ?seconds= (default 0.5) and say how long it took."""
    seconds = float(request.args.get("seconds", "0.5"))
    started = trio.current_time()
    await trio.sleep(seconds)
    return {"worked": trio.current_time() - started}


@app.get("/readyz")
async def readyz() -> tuple[str, int]:
    """200 while taking requests; 503 from the moment a drain begins."""
    return ("ready", 200) if readiness["ready"] else ("draining", 503)


class Requests:
    """How many requests are in flight, and a wait for none to be."""

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()
        self._none.set()

    def began(self) -> None:
        if not self.count:
            self._none = trio.Event()
        self.count += 1

    def ended(self) -> None:
        self.count -= 1
        if not self.count:
            self._none.set()

    async def wait_idle(self) -> None:
        await self._none.wait()


def run_requests_as_jobs(
    asgi: ASGIFramework, ctx: nd.ServiceContext, requests: Requests
) -> ASGIFramework:
    """Wrap an ASGI app so that every HTTP request is one in-flight job of *ctx*."""

    async def app_with_jobs(
        scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope["path"] == "/readyz":
            await asgi(scope, receive, send)
            return
        if ctx.draining:
            # Too late for new work: tell the client to go elsewhere, on a new connection.
            start: HTTPResponseStartEvent = {
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"connection", b"close"), (b"retry-after", b"1")],
                "trailers": False,
            }
            body: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": b"draining\n",
                "more_body": False,
            }
            await send(start)
            await send(body)
            return
        requests.began()
        try:
            async with ctx.job(
                f"{scope['method']} {scope['path']}", client=str(scope.get("client"))
            ):
                await asgi(scope, receive, send)
        finally:
            requests.ended()

    return app_with_jobs


sup = nd.Supervisor("http-service", grace=GRACE)


@sup.service
async def http(ctx: nd.ServiceContext) -> None:
    """Serve the API until a drain; then 503 readiness, stop accepting, finish requests."""
    # A named listener: at an upgrade (SIGUSR2, nursery-down upgrade) the next
    # generation inherits this very socket, so no connection is ever refused.
    sock = nd.listener("http", ADDRESS)
    host, port = sock.getsockname()[:2]
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn closes what it is given
    config.accesslog = None
    # hypercorn must not cut requests before our own grace deadline does.
    config.graceful_timeout = GRACE + 1.0
    stop_accepting = trio.Event()
    requests = Requests()
    asgi = shield_sends(run_requests_as_jobs(app, ctx, requests))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, asgi, config, shutdown_trigger=stop_accepting.wait))
        print(f"serving on http://{host}:{port}", file=sys.stderr, flush=True)
        readiness["ready"] = True
        ctx.ready()
        await ctx.wait_draining()
        readiness["ready"] = False  # readiness first...
        await trio.sleep(PRE_DRAIN)
        stop_accepting.set()  # ...then no new connections; hypercorn waits for requests
        # Our copy of the socket too: with no new generation holding it, connections are
        # refused at once (a client retries elsewhere) rather than queued for nobody.
        sock.close()
        # Once the last request was answered, only idle keep-alive connections are left:
        # close them now rather than wait for hypercorn's graceful_timeout. (A request
        # pipelined just as hypercorn closes its connection can also leave that
        # connection waiting until then.)
        await requests.wait_idle()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    raise SystemExit(nd.run(sup, dashboard=os.environ.get("HTTP_DASHBOARD") or None))
