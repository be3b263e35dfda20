"""A worker pool on a PostgresQueue (``DEAD_DSN``) whose jobs with ``"poison": true`` always
fail: with ``max_attempts=1`` they go straight to the dead letters. Puts three poison
jobs and one good one at start. Run with ``nursery-down run``.
"""

from __future__ import annotations

import os

import nursery_down as nd
from nursery_down.queues import PostgresQueue, QueuedJob

queue = PostgresQueue(os.environ["DEAD_DSN"], name="orders", max_attempts=1)
sup = nd.Supervisor("dead-letters")


async def handle(job: QueuedJob) -> None:
    if job.payload.get("poison"):
        raise ValueError(f"order {job.payload['order']} is poison <b>")


sup.add(nd.worker_pool(queue, handle, workers=2), name="orders")


@sup.service(restart="temporary", readiness=False)
async def seed(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await queue.put_many([{"order": n, "poison": n < 3} for n in range(4)])
