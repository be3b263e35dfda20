"""A small program for the systemd notify tests: two job loops that always have a job in flight.

``store`` starts first and takes no jobs. ``workers`` runs two loops of jobs of
``NOTIFY_JOB_SECONDS`` (default 0.4) each, the second half a job behind the first, so
at any instant at least one job is in flight. When ``NOTIFY_BLOCK_FILE`` names a
file, ``workers`` blocks the trio loop in ``time.sleep(NOTIFY_BLOCK_SECONDS)`` once
that file appears (and deletes it), as a buggy service would.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

import nursery_down as nd

JOB_SECONDS = float(os.environ.get("NOTIFY_JOB_SECONDS", "0.4"))
BLOCK_FILE = os.environ.get("NOTIFY_BLOCK_FILE")
BLOCK_SECONDS = float(os.environ.get("NOTIFY_BLOCK_SECONDS", "2.0"))

sup = nd.Supervisor("notify-target", grace=float(os.environ.get("NOTIFY_GRACE", "10")))


@sup.service
async def store(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await ctx.wait_draining()


async def numbers(first: int) -> AsyncIterator[int]:
    n = first
    while True:
        yield n
        n += 2
        await trio.lowlevel.checkpoint()


@sup.service(after=["store"])
async def workers(ctx: nd.ServiceContext) -> None:
    async def loop(first: int, delay: float) -> None:
        await trio.sleep(delay)
        async for n in ctx.intake(numbers(first)):
            async with ctx.job(f"job-{n}"):
                await trio.sleep(JOB_SECONDS)

    async def block_when_asked() -> None:
        if BLOCK_FILE is None:
            return
        marker = Path(BLOCK_FILE)
        while not ctx.draining:
            if marker.exists():
                marker.unlink()
                time.sleep(BLOCK_SECONDS)  # the bug this program stages: a blocked loop
            await trio.sleep(0.02)

    ctx.ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop, 0, 0.0)
        nursery.start_soon(loop, 1, JOB_SECONDS / 2)
        nursery.start_soon(block_when_asked)
