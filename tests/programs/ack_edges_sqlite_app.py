"""A worker pool over a SQLiteQueue whose acks are slowed, for test_pool_ack_edges.

Settings, from the environment: ``ACK_EDGES_DB`` (the queue file), ``ACK_EDGES_LEDGER``
(appended ``done <job id> <pid>`` when a handler returns, in one write system call),
``ACK_EDGES_ACK_MS`` (milliseconds each ack waits before it is written, 50) and
``ACK_EDGES_WORKERS`` (4). Each job's payload is the milliseconds its handler sleeps.
"""

from __future__ import annotations

import os

import trio

import nursery_down as nd
from nursery_down.queues import QueuedJob, SQLiteQueue

_ACK_SECONDS = int(os.environ.get("ACK_EDGES_ACK_MS", "50")) / 1000
_ledger = os.open(os.environ["ACK_EDGES_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class SlowAckQueue(SQLiteQueue):
    """Each ack takes a while before its write: acks stay pending behind the workers."""

    async def ack(self, job: QueuedJob) -> None:
        await trio.sleep(_ACK_SECONDS)
        await super().ack(job)


async def handle(job: QueuedJob) -> None:
    await trio.sleep(job.payload / 1000)
    os.write(_ledger, f"done {job.id} {os.getpid()}\n".encode())


queue = SlowAckQueue(os.environ["ACK_EDGES_DB"])
sup = nd.Supervisor("ack-edges", grace=20.0)
sup.add(
    nd.worker_pool(queue, handle, workers=int(os.environ.get("ACK_EDGES_WORKERS", "4"))),
    name="workers",
)
