"""A program whose only service does its work and returns: `nursery-down run` exits 0."""

from __future__ import annotations

import nursery_down as nd

sup = nd.Supervisor("oneshot")
not_a_supervisor = 42


@sup.service(restart="temporary")
async def once(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    async with ctx.job("only"):
        pass
