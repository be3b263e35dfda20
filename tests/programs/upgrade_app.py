"""A program that upgrades itself: a TCP service on a named listener.

``http`` answers each connection with one line, ``<pid> <generation>``; its socket comes
from ``nd.listener`` so that a new generation inherits it. A drain stops the accepting,
never an answer: a connection accepted as the drain begins is answered too. Environment:

- ``UPGRADE_APP_PORT_FILE``: where to write the listener's port (once bound)
- ``UPGRADE_APP_GENERATION_FILE``: a file holding the generation's label, read at start
  (the test changes it between upgrades, as a deploy changes the code)
- ``UPGRADE_APP_MODE``: ``ok`` (default), ``crash`` (exit 3 before ready), ``hang``
  (never ready), ``fail`` (``http`` raises at each start, so it ends FAILED),
  ``slow`` (ready after 1 s) or ``gated`` (ready once ``UPGRADE_APP_GATE_FILE``
  exists), read from ``UPGRADE_APP_MODE_FILE`` when that is set
- ``UPGRADE_APP_GRACE``: the grace in seconds (default 5)
- ``UPGRADE_APP_TIMEOUT``: seconds a new generation has to be ready (default 60)
- ``UPGRADE_APP_DASHBOARD``: ``HOST:PORT`` of the dashboard (default: none)
- ``UPGRADE_APP_HOLD_FILE``: when set, a second service ``held`` runs one job,
  ``held-<generation>``, until that file exists (the test creates it): a job that
  holds a generation's drain for as long as the test needs
"""

from __future__ import annotations

import os
import sys
from functools import partial
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
    if MODE == "fail":
        raise RuntimeError(f"generation {GENERATION} cannot serve")
    if MODE == "slow":
        await trio.sleep(1.0)
    if MODE == "gated":
        while not Path(os.environ["UPGRADE_APP_GATE_FILE"]).exists():  # the test creates it
            await trio.sleep(0.02)
    # As documented: a duplicate of the (non-blocking) socket for trio.serve_listeners.
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))]

    async def reply(stream: trio.SocketStream) -> None:
        await stream.send_all(f"{os.getpid()} {GENERATION}\n".encode())
        await stream.aclose()

    async def answer(stream: trio.SocketStream) -> None:
        try:
            async with ctx.job(f"connection-{id(stream)}"):
                await reply(stream)
        except nd.DrainingError:
            # Accepted in the instant the drain began (both generations accept until
            # the old one has seen the new one ready): still ours to answer.
            await reply(stream)

    # Every connection accepted is answered: the drain stops the accepting, never a
    # handler (they run in a nursery of their own, which the service waits for).
    async with trio.open_nursery() as handlers, trio.open_nursery() as accepting:
        await accepting.start(
            partial(trio.serve_listeners, answer, listeners, handler_nursery=handlers)
        )
        ctx.ready()
        await ctx.wait_draining()
        accepting.cancel_scope.cancel()  # stop accepting; the new generation accepts


HOLD_FILE = os.environ.get("UPGRADE_APP_HOLD_FILE", "")
if HOLD_FILE:

    @sup.service
    async def held(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job(f"held-{GENERATION}", generation=GENERATION):
            while not Path(HOLD_FILE).exists():  # the test creates it to release the job
                await trio.sleep(0.02)
        await ctx.wait_draining()


if __name__ == "__main__":
    raise SystemExit(
        nd.run(
            sup,
            dashboard=os.environ.get("UPGRADE_APP_DASHBOARD") or None,
            upgrade_timeout=float(os.environ.get("UPGRADE_APP_TIMEOUT", "60")),
        )
    )
