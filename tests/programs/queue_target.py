"""A queue worker with fast jobs, for the SIGKILL and SIGTERM tests of the SQLite queue.

Run it the way an operator would::

    QUEUE_TARGET_DB=/tmp/jobs.db QUEUE_TARGET_LEDGER=/tmp/ledger \\
        nursery-down run tests/programs/queue_target.py:sup

Service ``workers`` is a worker pool over the SQLiteQueue at ``QUEUE_TARGET_DB``.
Each job's payload is ``{"ms": <milliseconds>, "poison": <bool>}``: the handler
sleeps that long, then a poison job raises, and any other job appends
``done <job id> <pid> <time>`` to the ledger (one write system call, so a SIGKILL
never leaves half a line) before returning, after which the pool acks it.
Service ``up`` starts once the pool is ready and appends ``up <pid> <time>``.

Settings, from the environment:

- ``QUEUE_TARGET_DB`` (required): the queue file;
- ``QUEUE_TARGET_LEDGER`` (required): the ledger file, appended to;
- ``QUEUE_TARGET_WORKERS``: worker tasks (4);
- ``QUEUE_TARGET_MAX_ATTEMPTS``: failures before a job is dead-lettered (3).
"""

from __future__ import annotations

import os
import time

import trio

import nursery_down as nd
from nursery_down.queues import QueuedJob, SQLiteQueue

queue = SQLiteQueue(
    os.environ["QUEUE_TARGET_DB"],
    max_attempts=int(os.environ.get("QUEUE_TARGET_MAX_ATTEMPTS", "3")),
)
_ledger = os.open(os.environ["QUEUE_TARGET_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def note(line: str) -> None:
    os.write(_ledger, f"{line} {os.getpid()} {time.time()!r}\n".encode())


class PoisonError(Exception):
    """What a poison job always raises."""


async def handle(job: QueuedJob) -> None:
    await trio.sleep(job.payload["ms"] / 1000)
    if job.payload["poison"]:
        raise PoisonError(f"job {job.id} is poison")
    note(f"done {job.id}")


sup = nd.Supervisor("queue-target", grace=10.0)
sup.add(
    nd.worker_pool(queue, handle, workers=int(os.environ.get("QUEUE_TARGET_WORKERS", "4"))),
    name="workers",
)


@sup.service(after=["workers"])
async def up(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    note("up")
    await ctx.wait_draining()
