"""One worker process of a fleet: a PostgresQueue shared with the others.

``invoices`` runs each job for ``FLEET_JOB_SECONDS`` (default 0.2) on 4 workers. With
``FLEET_PRODUCE`` set, ``producer`` also puts a job every 0.05 s. The queue (and so the
fleet) is in ``FLEET_DSN``. Run with ``nursery-down run tests/programs/fleet_worker.py:sup``.
"""

from __future__ import annotations

import os

import trio

import nursery_down as nd
from nursery_down.queues import PostgresQueue, QueuedJob

JOB_SECONDS = float(os.environ.get("FLEET_JOB_SECONDS", "0.2"))

queue = PostgresQueue(os.environ["FLEET_DSN"], name="invoices", heartbeat=0.2, lease=1.0)
sup = nd.Supervisor("invoices", grace=5.0)


async def handle(job: QueuedJob) -> None:
    await trio.sleep(JOB_SECONDS)


sup.add(nd.worker_pool(queue, handle, workers=4), name="invoices")

if os.environ.get("FLEET_PRODUCE"):

    @sup.service
    async def producer(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        number = 0
        while not ctx.draining:
            number += 1
            await queue.put({"invoice": number})
            with trio.move_on_after(0.05):
                await ctx.wait_draining()
