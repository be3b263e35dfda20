"""The deploy-day scenario: 20 workers on a durable queue that a deploy must not lose.

A producer adds about 20 messages a second to a SQLite queue; 20 workers take about
3 s per message, so a backlog builds, as it does in real life. Three services, in
start order:

- ``queue``: opens the SQLite file (requeueing jobs left leased by a killed run) and
  keeps it open until everything else stopped: a shared resource stops last;
- ``workers``: ``nd.worker_pool`` with 20 workers;
- ``producer``: the ingress; it stops first.

Press Ctrl-C (or send SIGTERM, or click Drain on the dashboard): the producer stops,
the workers take nothing new, the messages in flight finish, and the process exits 0.
Kill it with SIGKILL instead and run it again: the messages that were in flight are
requeued and run again. Nothing is lost.

    python examples/queue_worker.py
    nursery-down run examples/queue_worker.py:sup --dashboard 127.0.0.1:8080

Settings (environment): QUEUE_PATH (default queue-worker.sqlite3), QUEUE_RATE
(messages per second, default 20; 0 adds none), QUEUE_JOB_SECONDS (default 3),
QUEUE_WORKERS (default 20), QUEUE_GRACE (default 30), QUEUE_DASHBOARD (HOST:PORT,
default 127.0.0.1:8080; "off" for none), QUEUE_POISON_EVERY (every Nth message fails
every attempt, to show dead letters; default 0: none).
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncGenerator

import trio

import nursery_down as nd
from nursery_down.queues import QueuedJob, SQLiteQueue

QUEUE_PATH = os.environ.get("QUEUE_PATH", "queue-worker.sqlite3")
RATE = float(os.environ.get("QUEUE_RATE", "20"))
JOB_SECONDS = float(os.environ.get("QUEUE_JOB_SECONDS", "3"))
WORKERS = int(os.environ.get("QUEUE_WORKERS", "20"))
GRACE = float(os.environ.get("QUEUE_GRACE", "30"))
DASHBOARD = os.environ.get("QUEUE_DASHBOARD", "127.0.0.1:8080")
POISON_EVERY = int(os.environ.get("QUEUE_POISON_EVERY", "0"))

queue = SQLiteQueue(QUEUE_PATH, max_attempts=3)
sup = nd.Supervisor("queue-worker", grace=GRACE)


@sup.service(name="queue")
async def keep_queue_open(ctx: nd.ServiceContext) -> None:
    """Open the queue first (recovering orphaned leases), close it last."""
    async with queue:
        stats = await queue.statistics()
        print(f"queue {QUEUE_PATH}: {stats.queued} queued, {stats.dead} dead", flush=True)
        ctx.ready()
        await ctx.wait_draining()


async def handle(job: QueuedJob) -> None:
    """Process one message: about JOB_SECONDS of work."""
    if POISON_EVERY and job.payload["n"] % POISON_EVERY == 0:
        raise ValueError(f"message {job.payload['n']} is malformed")
    await trio.sleep(JOB_SECONDS * random.uniform(0.8, 1.2))


sup.add(nd.worker_pool(queue, handle, workers=WORKERS), name="workers", after=["queue"])


@sup.service(after=["workers"], restart="transient")
async def producer(ctx: nd.ServiceContext) -> None:
    """Add about RATE messages a second until a drain begins."""
    ctx.ready()
    if RATE <= 0:
        return
    stats = await queue.statistics()
    number = stats.queued + stats.leased + stats.done + stats.dead
    async for _ in ctx.intake(ticks(1.0 / RATE)):
        number += 1
        await queue.put({"n": number})


async def ticks(interval: float) -> AsyncGenerator[None, None]:
    """An endless clock: yields every *interval* seconds."""
    while True:
        await trio.sleep(interval)
        yield


if __name__ == "__main__":
    dashboard = None if DASHBOARD.lower() in ("", "off", "none") else DASHBOARD
    raise SystemExit(nd.run(sup, dashboard=dashboard))
