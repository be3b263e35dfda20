"""A worker on an in-memory queue, recorded: what a SIGKILL takes with it is lost.

Jobs live only in the process (a MemoryQueue), wrapped in a RecordingSource that
appends every event to ``$NURSERY_DOWN_HISTORY``. A producer puts a job every
20 ms; two workers take 100 ms each. Run it under a ChaosHarness::

    nursery-down run tests/programs/chaos_memory.py:sup
"""

from __future__ import annotations

import os

import trio

import nursery_down as nd
from nursery_down.queues import MemoryQueue, QueuedJob
from nursery_down.testing import RecordingSource

queue = RecordingSource(MemoryQueue(), os.environ["NURSERY_DOWN_HISTORY"])
sup = nd.Supervisor("memory-worker", grace=5.0)


async def handle(job: QueuedJob) -> None:
    await trio.sleep(0.1)


sup.add(nd.worker_pool(queue, queue.wrap(handle), workers=2), name="workers")


@sup.service(after=["workers"])
async def producer(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    number = 0
    while not ctx.draining:
        number += 1
        queue.put_nowait({"n": number})
        with trio.move_on_after(0.02):
            await ctx.wait_draining()
