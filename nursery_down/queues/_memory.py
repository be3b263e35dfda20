"""MemoryQueue: an in-process job source, for tests and simple programs."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NoReturn

import trio

from .._exceptions import ConfigurationError, NotLeasedError, describe_error
from .._validate import is_count
from ._source import DeadJob, QueuedJob, QueueStatistics


class MemoryQueue:
    """An in-process :class:`JobSource`: the same rules as :class:`SQLiteQueue`, no file.

    Jobs live only as long as the process, so use it for tests and for work that may
    be lost with the process; use :class:`SQLiteQueue` when jobs must survive a crash::

        queue = MemoryQueue(max_attempts=3)
        queue.put_nowait({"order": 17})
        sup.add(nd.worker_pool(queue, handle), name="orders")

    Jobs are claimed oldest first. A released job goes back ahead of every job put
    after it (it was next anyway), so several released jobs keep their order; a
    failed one goes to the back, so a poison job does not hold up the others.
    After ``max_attempts`` failures a job goes to :meth:`dead_letters`.

    :meth:`close` says no more jobs will be put: ``claim()`` then returns ``None``
    once nothing is queued or claimed. Until then a claim waits for work.

    For speed, ``claim()`` returns at once without yielding to other tasks when a
    job is waiting, and ``ack``/``release``/``fail`` never yield: they only change
    in-memory state.
    """

    def __init__(self, *, max_attempts: int = 5) -> None:
        if not is_count(max_attempts):
            raise ConfigurationError(
                f"max_attempts must be a whole number >= 1, got {max_attempts!r}"
            )
        self.max_attempts = max_attempts
        self._ids = itertools.count(1)
        self._queued: deque[QueuedJob] = deque()
        self._leased: dict[int, QueuedJob] = {}
        self._dead: list[DeadJob] = []
        self._done = 0
        self._closed = False
        self._available: trio.Event | None = None

    # -- putting ------------------------------------------------------------------------

    def put_nowait(self, payload: Any) -> int:
        """Add a job and return its id. Any object may be a payload (nothing is copied)."""
        if self._closed:
            raise trio.ClosedResourceError("this MemoryQueue was closed; no more jobs can be put")
        job_id = next(self._ids)
        self._queued.append(QueuedJob(job_id, payload, 0))
        self._wake()
        return job_id

    async def put(self, payload: Any) -> int:
        """Add a job and return its id (never waits: the queue has no size limit)."""
        await trio.lowlevel.checkpoint()
        return self.put_nowait(payload)

    def put_many_nowait(self, payloads: Iterable[Any]) -> list[int]:
        """Add one job per payload, in order, and return their ids."""
        return [self.put_nowait(payload) for payload in payloads]

    def close(self) -> None:
        """No more jobs will be put: claims return ``None`` once every job is settled."""
        self._closed = True
        self._wake()

    # -- the JobSource protocol ---------------------------------------------------------

    def claim_nowait(self) -> QueuedJob:
        """Claim the oldest queued job, or raise :exc:`trio.WouldBlock` if none is queued."""
        if not self._queued:
            raise trio.WouldBlock
        job = self._queued.popleft()
        self._leased[job.id] = job
        return job

    async def claim(self) -> QueuedJob | None:
        """Wait for a job and claim it; ``None`` once closed and every job is settled."""
        while True:
            if self._queued:
                job = self._queued.popleft()
                self._leased[job.id] = job
                return job
            if self._closed and not self._leased:
                await trio.lowlevel.checkpoint()
                return None
            if self._available is None:
                self._available = trio.Event()
            # Nothing is taken before this wait ends, so cancelling it claims nothing.
            await self._available.wait()

    async def ack(self, job: QueuedJob) -> None:
        """The job is done: it is never handed out again."""
        self.ack_nowait(job)

    def ack_nowait(self, job: QueuedJob) -> None:
        """:meth:`ack` without the ``await``: it never blocks."""
        # _take_lease() inlined: this runs once per job on a worker pool's hot path.
        held = self._leased.pop(job.id, None)
        if held is not job:
            self._restore_and_raise(job, held, "ack")
        self._done += 1
        if self._closed and not self._leased:
            self._wake()  # a claim waiting for the last lease may now return None

    async def release(self, job: QueuedJob) -> None:
        """Put the job back, unstarted, ahead of the jobs put after it; no attempt counted."""
        self._take_lease(job, "release")
        queued = self._queued
        # A leased job was claimed before every job still queued but the failed ones
        # at the back, so the search ends at once, or after the jobs released before it.
        position = next(
            (index for index, other in enumerate(queued) if other.id > job.id), len(queued)
        )
        queued.insert(position, job)
        self._wake()

    async def fail(self, job: QueuedJob, error: BaseException | str) -> None:
        """Count a failed attempt: retry the job later, or dead-letter it after ``max_attempts``."""
        self._take_lease(job, "fail")
        attempts = job.attempts + 1
        if attempts >= self.max_attempts:
            self._dead.append(
                DeadJob(job.id, job.payload, attempts, describe_error(error), time.time())
            )
        else:
            self._queued.append(QueuedJob(job.id, job.payload, attempts))
        # Either way a claim waiting for the last lease to settle (after close) may end.
        self._wake()

    # -- reading ------------------------------------------------------------------------

    def statistics(self) -> QueueStatistics:
        """How many jobs are queued, leased, done and dead right now."""
        return QueueStatistics(
            queued=len(self._queued),
            leased=len(self._leased),
            done=self._done,
            dead=len(self._dead),
        )

    def dead_letters(self) -> list[DeadJob]:
        """The jobs that failed ``max_attempts`` times, oldest first."""
        return list(self._dead)

    def requeue_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Put dead letters *ids* (all when None) back in the queue with their attempts
        reset; return how many. Unknown ids are ignored."""
        chosen = None if ids is None else set(ids)
        back = [job for job in self._dead if chosen is None or job.id in chosen]
        self._dead = [job for job in self._dead if job not in back]
        self._queued.extend(QueuedJob(job.id, job.payload, 0) for job in back)
        if back:
            self._wake()
        return len(back)

    def purge_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Delete dead letters *ids* (all when None) for good; return how many."""
        chosen = None if ids is None else set(ids)
        kept = [job for job in self._dead if chosen is not None and job.id not in chosen]
        purged = len(self._dead) - len(kept)
        self._dead = kept
        return purged

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- internals ----------------------------------------------------------------------

    def _take_lease(self, job: QueuedJob, action: str) -> None:
        held = self._leased.pop(job.id, None)
        if held is not job:
            self._restore_and_raise(job, held, action)

    def _restore_and_raise(self, job: QueuedJob, held: QueuedJob | None, action: str) -> NoReturn:
        if held is not None:  # another job object with the same id: keep its lease
            self._leased[held.id] = held
        raise NotLeasedError(
            f"cannot {action} job {job.id}: this queue does not hold it as claimed "
            "(was it settled already, or claimed from another queue?)"
        )

    def _wake(self) -> None:
        if self._available is not None:
            self._available.set()
            self._available = None
