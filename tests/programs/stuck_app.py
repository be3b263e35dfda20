"""A job stuck in a known function: ``nursery-down run tests/programs/stuck_app.py:sup``.

One service, ``loader``, holds two jobs: ``stuck-1`` waits forever in
:func:`wait_for_the_database` (a drain can only cut it at the grace), and ``slow-1``
finishes 0.2 s after a drain began. ``STUCK_APP_GRACE`` sets the grace (default 30 s).
"""

from __future__ import annotations

import os

import trio

import nursery_down as nd

GRACE = float(os.environ.get("STUCK_APP_GRACE", "30"))

sup = nd.Supervisor(name="depot", grace=GRACE)


async def wait_for_the_database() -> None:
    """Where the stuck job waits."""
    await trio.sleep_forever()


@sup.service
async def loader(ctx: nd.ServiceContext) -> None:
    async def stuck() -> None:
        async with ctx.job("stuck-1", table="orders"):
            await wait_for_the_database()

    async def slow() -> None:
        async with ctx.job("slow-1"):
            await ctx.wait_draining()
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck)
        nursery.start_soon(slow)
        ctx.ready()
        await ctx.wait_draining()
