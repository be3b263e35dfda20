"""One worker process of a fleet: jobs from a PostgreSQL queue that many processes share.

Run several, on one machine or many, against the same database: each job runs in one
of them; a drained or killed one loses nothing (leases and the sweeper hand its jobs
to the others); and the dashboard of any of them shows and drives all of them on its
fleet page (``/fleet``) and with ``nursery-down fleet``.

    FLEET_DSN=postgresql://app@db/app nursery-down run examples/fleet_worker.py:sup \\
        --dashboard 127.0.0.1:8080
    make demo-fleet                # two of them and a throwaway database, on this machine

Settings (environment): FLEET_DSN (required), FLEET_PRODUCE (set: this process also
puts FLEET_RATE jobs a second, default 10), FLEET_JOB_SECONDS (default 1),
FLEET_WORKERS (default 8), FLEET_GRACE (default 30).
Needs ``pip install 'nursery-down[dashboard,postgres]'``.
"""

from __future__ import annotations

import os
import random

import trio

import nursery_down as nd
from nursery_down.queues import PostgresQueue, QueuedJob

DSN = os.environ.get("FLEET_DSN", "")
RATE = float(os.environ.get("FLEET_RATE", "10"))
JOB_SECONDS = float(os.environ.get("FLEET_JOB_SECONDS", "1"))
WORKERS = int(os.environ.get("FLEET_WORKERS", "8"))
GRACE = float(os.environ.get("FLEET_GRACE", "30"))

if not DSN:
    raise nd.ConfigurationError(
        "set FLEET_DSN to a PostgreSQL connection string, e.g. postgresql://app@db/app"
    )

queue = PostgresQueue(DSN, name="demo", max_attempts=3)
sup = nd.Supervisor("fleet-demo", grace=GRACE)


async def handle(job: QueuedJob) -> None:
    """Work for about FLEET_JOB_SECONDS."""
    await trio.sleep(JOB_SECONDS * random.uniform(0.5, 1.5))


sup.add(nd.worker_pool(queue, handle, workers=WORKERS), name="workers")

if os.environ.get("FLEET_PRODUCE") and RATE > 0:

    @sup.service
    async def producer(ctx: nd.ServiceContext) -> None:
        """Put FLEET_RATE jobs a second until the drain."""
        ctx.ready()
        number = 0
        while not ctx.draining:
            number += 1
            await queue.put({"job": number})
            with trio.move_on_after(1 / RATE):
                await ctx.wait_draining()
