"""A program whose data a browser must cope with (``nursery-down run ...hostile_app.py:sup``).

``db.primary-2`` holds one job whose key and info are not finite numbers and announces
a measurement that is NaN; ``a..`` and ``_cache`` have names that a careless page would
turn into other addresses. Every service stops when drained.
"""

from __future__ import annotations

import nursery_down as nd

sup = nd.Supervisor(name="hostile", grace=30.0)


@sup.service(name="db.primary-2")
async def primary(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    sup.announce("measured a ratio", ratio=float("nan"), rate=float("inf"))
    async with ctx.job(float("nan"), ratio=float("nan"), rate=float("-inf")):
        await ctx.wait_draining()


@sup.service(name="a..")
async def dots(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await ctx.wait_draining()


@sup.service(name="_cache")
async def cache(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await ctx.wait_draining()
