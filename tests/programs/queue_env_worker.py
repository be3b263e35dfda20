"""A queue worker that reads its SQLite queue's path from ``$WORKER_JOBS_FILE``.

Not ``$QUEUE_PATH``: a chaos run must be told the variable (``--queue-env``, or
``ChaosHarness(queue_env=...)``). A producer puts a job every 20 ms; two workers
take 50 ms each. Run it under a ChaosHarness::

    nursery-down run tests/programs/queue_env_worker.py:sup
"""

from __future__ import annotations

import os

import trio

import nursery_down as nd
from nursery_down.queues import QueuedJob, SQLiteQueue

queue = SQLiteQueue(os.environ["WORKER_JOBS_FILE"])
sup = nd.Supervisor("queue-env-worker", grace=5.0)


@sup.service(name="queue")
async def keep_queue_open(ctx: nd.ServiceContext) -> None:
    async with queue:
        ctx.ready()
        await ctx.wait_draining()


async def handle(job: QueuedJob) -> None:
    await trio.sleep(0.05)


sup.add(nd.worker_pool(queue, handle, workers=2), name="workers", after=["queue"])


@sup.service(after=["workers"])
async def producer(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    number = 0
    while not ctx.draining:
        number += 1
        await queue.put({"n": number})
        with trio.move_on_after(0.02):
            await ctx.wait_draining()
