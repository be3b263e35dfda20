"""A fleet member whose queue is opened and closed by a service of its own.

``queue`` opens the PostgresQueue in ``FLEET_DSN`` with ``async with`` and closes it
when it drains; ``invoices``, a worker pool on it, starts after it and so stops
before it. The fleet's last report is written after the queue closed. Run with
``nursery-down run tests/programs/fleet_queue_owner.py:sup``.
"""

from __future__ import annotations

import os

import trio

import nursery_down as nd
from nursery_down.queues import PostgresQueue, QueuedJob

queue = PostgresQueue(os.environ["FLEET_DSN"], name="owned")
sup = nd.Supervisor("owner", grace=5.0)


@sup.service(name="queue")
async def own_queue(ctx: nd.ServiceContext) -> None:
    async with queue:
        ctx.ready()
        await ctx.wait_draining()


async def handle(job: QueuedJob) -> None:
    await trio.sleep(0)


sup.add(nd.worker_pool(queue, handle, workers=2), name="invoices", after=["queue"])
