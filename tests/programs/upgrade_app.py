"""A program that upgrades itself: a TCP service on a named listener, and a queue worker.

``http`` answers each connection with one line, ``<pid> <generation>``; its socket comes
from ``nd.listener`` so that a new generation inherits it. Environment:

- ``UPGRADE_APP_PORT_FILE``: where to write the listener's port (once bound)
- ``UPGRADE_APP_GENERATION_FILE``: a file holding the generation's label, read at start
  (the test changes it between upgrades, as a deploy changes the code)
- ``UPGRADE_APP_MODE``: ``ok`` (default), ``crash`` (exit 3 before ready) or ``hang``
  (never ready), read from ``UPGRADE_APP_MODE_FILE`` when that is set
- ``UPGRADE_APP_GRACE``: the grace in seconds (default 5)
- ``UPGRADE_APP_TIMEOUT``: seconds a new generation has to be ready (default 60)
- ``UPGRADE_APP_DASHBOARD``: ``HOST:PORT`` of the dashboard (default: none)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

import nursery_down as nd


def _read(name: str, default: str) -> str:
    path = os.environ.get(name)
    if path and Path(path).exists():
        return Path(path).read_text().strip() or default
    return default


GENERATION = _read("UPGRADE_APP_GENERATION_FILE", "1")
MODE = _read("UPGRADE_APP_MODE_FILE", os.environ.get("UPGRADE_APP_MODE", "ok"))
GRACE = float(os.environ.get("UPGRADE_APP_GRACE", "5"))

sup = nd.Supervisor("upgrade-app", grace=GRACE)


@sup.service
async def http(ctx: nd.ServiceContext) -> None:
    sock = nd.listener("http", ("127.0.0.1", 0))
    port_file = os.environ.get("UPGRADE_APP_PORT_FILE")
    if port_file:
        temporary = Path(port_file + ".tmp")
        temporary.write_text(str(sock.getsockname()[1]))
        temporary.replace(port_file)
    if MODE == "crash":
        print(f"generation {GENERATION}: crashing before ready", file=sys.stderr, flush=True)  # noqa: T201
        raise SystemExit(3)
    if MODE == "hang":
        await trio.sleep_forever()
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))]

    async def answer(stream: trio.SocketStream) -> None:
        async with ctx.job(f"connection-{id(stream)}"):
            await stream.send_all(f"{os.getpid()} {GENERATION}\n".encode())
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, answer, listeners)
        ctx.ready()
        await ctx.wait_draining()
        nursery.cancel_scope.cancel()  # stop accepting; the new generation accepts


if __name__ == "__main__":
    raise SystemExit(
        nd.run(
            sup,
            dashboard=os.environ.get("UPGRADE_APP_DASHBOARD") or None,
            upgrade_timeout=float(os.environ.get("UPGRADE_APP_TIMEOUT", "60")),
        )
    )
