"""A program that is slow to start, for signals sent while it starts up.

``python tests/programs/slow_start.py`` runs ``nd.run(sup, dashboard="127.0.0.1:0")``
with one service that takes ``SLOW_START_SECONDS`` (default 0.4) before it calls
``ctx.ready()``, then runs ``SLOW_START_WORKERS`` (default 2) workers that take
numbers from an intake and run each as a job of ``SLOW_START_JOB_SECONDS`` (default
0.3). The supervisor's grace is ``SLOW_START_GRACE`` (default 5).

It writes a ledger to ``SLOW_START_LEDGER``, one whole line per ``os.write`` (so a
kill never leaves half a line): ``up TIME`` each time the service is ready,
``start N TIME`` and ``done N TIME`` around each job. Just before calling ``nd.run``
it prints the marker line ``slow_start: calling nd.run`` to stderr.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import trio

import nursery_down as nd

START_SECONDS = float(os.environ.get("SLOW_START_SECONDS", "0.4"))
JOB_SECONDS = float(os.environ.get("SLOW_START_JOB_SECONDS", "0.3"))
WORKERS = int(os.environ.get("SLOW_START_WORKERS", "2"))
GRACE = float(os.environ.get("SLOW_START_GRACE", "5"))
LEDGER = os.open(
    os.environ.get("SLOW_START_LEDGER", os.devnull), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
)
MARKER = "slow_start: calling nd.run"

sup = nd.Supervisor("slow-start", grace=GRACE)


def note(*fields: object) -> None:
    os.write(LEDGER, (" ".join(str(f) for f in (*fields, time.time())) + "\n").encode())


@sup.service
async def work(ctx: nd.ServiceContext) -> None:
    await trio.sleep(START_SECONDS)  # opening connections, warming caches...
    note("up")
    ctx.ready()
    send, receive = trio.open_memory_channel[int](0)

    async def feed() -> None:
        for number in itertools.count():
            await send.send(number)

    async def worker() -> None:
        async for number in ctx.intake(receive):
            async with ctx.job(f"job-{number}"):
                note("start", number)
                await trio.sleep(JOB_SECONDS)
                note("done", number)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        await ctx.run_workers(WORKERS, worker)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    print(MARKER, file=sys.stderr, flush=True)  # noqa: T201
    raise SystemExit(nd.run(sup, dashboard="127.0.0.1:0"))
