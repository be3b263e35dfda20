"""A small shop for the dashboard tests: ``nursery-down run tests/programs/dashboard_app.py:sup``.

Three services: ``intake`` (ingress, takes no jobs), ``workers`` (a pool of workers
whose jobs come and go, so the in-flight count moves) and ``mailer`` (one slow job
at a time). Environment variables tune it:

- ``DASHBOARD_APP_WORKERS``: workers in the pool (default 6; 0 means no jobs at all)
- ``DASHBOARD_APP_JOB``: ``MIN,MAX`` seconds a job takes (default ``0.5,2.0``)
- ``DASHBOARD_APP_INFO_BYTES``: size of a padding field in each job's info (default 0),
  to make snapshots big
- ``DASHBOARD_APP_GRACE``: the supervisor's grace in seconds (default 30)
- ``DASHBOARD_APP_READY_FILE``: ``intake`` is ready only once this file exists, which
  holds the whole app in start-up until the test creates it (default: ready at once)
"""

from __future__ import annotations

import os
import random

import trio

import nursery_down as nd

WORKERS = int(os.environ.get("DASHBOARD_APP_WORKERS", "6"))
JOB_MIN, JOB_MAX = (float(x) for x in os.environ.get("DASHBOARD_APP_JOB", "0.5,2.0").split(","))
PADDING = "x" * int(os.environ.get("DASHBOARD_APP_INFO_BYTES", "0"))
GRACE = float(os.environ.get("DASHBOARD_APP_GRACE", "30"))
READY_FILE = os.environ.get("DASHBOARD_APP_READY_FILE")

sup = nd.Supervisor(name="shop", grace=GRACE)


@sup.service
async def intake(ctx: nd.ServiceContext) -> None:
    while READY_FILE and not os.path.exists(READY_FILE):
        await trio.sleep(0.02)
    ctx.ready()
    await ctx.wait_draining()


@sup.service(after=["intake"])
async def workers(ctx: nd.ServiceContext) -> None:
    async with trio.open_nursery() as nursery:
        for number in range(WORKERS):
            nursery.start_soon(_work, ctx, number)
        ctx.ready()
        await ctx.wait_draining()


@sup.service(after=["intake"])
async def mailer(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    if WORKERS:
        await _work(ctx, 0, prefix="mail")
    else:
        await ctx.wait_draining()


async def _work(ctx: nd.ServiceContext, number: int, *, prefix: str = "job") -> None:
    done = 0
    info = {"worker": number, **({"padding": PADDING} if PADDING else {})}
    while not ctx.draining:
        done += 1
        async with ctx.job(f"{prefix}-{number}-{done}", **info):
            await trio.sleep(random.uniform(JOB_MIN, JOB_MAX))
        # A short pause between jobs, so the in-flight count moves.
        with trio.move_on_after(random.uniform(0.0, 0.3)):
            await ctx.wait_draining()


if __name__ == "__main__":
    raise SystemExit(nd.run(sup, dashboard=os.environ.get("DASHBOARD_APP_ADDRESS", "127.0.0.1:0")))
