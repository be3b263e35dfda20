"""A worker pool over a PostgresQueue, for the tests that kill a fleet member.

Run it the way an operator would::

    PG_WORKER_DSN=postgresql://... PG_WORKER_LEDGER=/tmp/ledger \\
        nursery-down run tests/programs/pg_worker.py:sup --no-dashboard

Service ``workers`` is a worker pool over the PostgresQueue named ``PG_WORKER_NAME``
(``jobs``). Each job's payload is ``{"ms": <milliseconds>}``: the handler appends
``start <job id> <pid> <time>`` to the ledger, sleeps that long, then appends
``done <job id> <pid> <time>`` (one write system call each, so a SIGKILL never
leaves half a line). ``PG_WORKER_WORKERS`` sets the worker tasks (4),
``PG_WORKER_LEASE`` and ``PG_WORKER_HEARTBEAT`` the queue's lease and heartbeat (30, 1).
"""

from __future__ import annotations

import os
import time

import trio

import nursery_down as nd
from nursery_down.queues import PostgresQueue, QueuedJob

queue = PostgresQueue(
    os.environ["PG_WORKER_DSN"],
    name=os.environ.get("PG_WORKER_NAME", "jobs"),
    lease=float(os.environ.get("PG_WORKER_LEASE", "30")),
    heartbeat=float(os.environ.get("PG_WORKER_HEARTBEAT", "1")),
)
_ledger = os.open(os.environ["PG_WORKER_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def note(line: str) -> None:
    os.write(_ledger, f"{line} {os.getpid()} {time.time()!r}\n".encode())


async def handle(job: QueuedJob) -> None:
    note(f"start {job.id}")
    await trio.sleep(job.payload["ms"] / 1000)
    note(f"done {job.id}")


sup = nd.Supervisor("pg-worker", grace=10.0)
sup.add(
    nd.worker_pool(queue, handle, workers=int(os.environ.get("PG_WORKER_WORKERS", "4"))),
    name="workers",
)
