"""The JobSource protocol and the values every source hands out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """One job handed out by :meth:`JobSource.claim`.

    Settle it exactly once, with the source that handed it out: ``ack`` when done,
    ``release`` to put it back unstarted, ``fail`` when the attempt went wrong.
    """

    #: Unique within its source; stable across claims, releases and retries.
    id: int
    #: What was put into the source.
    payload: Any
    #: Failed attempts before this claim (0 on the first try).
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class DeadJob:
    """A job that failed ``max_attempts`` times and went to the dead-letter list."""

    id: int
    payload: Any
    #: Failed attempts in all (equal to the source's ``max_attempts``).
    attempts: int
    #: The last error, as ``"ExceptionType: message"``.
    error: str
    #: ``time.time()`` when it went to the dead-letter list.
    died_at: float


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """Counts of a source's jobs at one instant."""

    #: Waiting to be claimed.
    queued: int
    #: Claimed and not yet settled (in flight somewhere).
    leased: int
    #: Acked.
    done: int
    #: In the dead-letter list.
    dead: int


@runtime_checkable
class JobSource(Protocol):
    """Where a worker pool takes its jobs from, and reports back to.

    - ``claim()`` waits until a job is available and returns it, leased to the
      caller. It returns ``None`` only when the source is closed and will never hand
      out another job. Cancelling a waiting ``claim()`` claims nothing: a job is
      either returned or left in the source.
    - ``ack(job)``: the job is done; it is never handed out again.
    - ``release(job)``: put the job back unstarted (it was claimed but not run, or
      was hard-cancelled at a grace deadline). Its attempt is not counted.
    - ``fail(job, error)``: the attempt failed. The job is retried until it has
      failed ``max_attempts`` times, then goes to the dead-letter list.

    Callers should shield ``ack``, ``release`` and ``fail`` from cancellation
    (:func:`nursery_down.worker_pool` does), so that a job is never left half-settled.

    A source that can claim or ack without blocking may also offer
    ``claim_nowait()`` (returning a job, or raising :exc:`trio.WouldBlock` when none
    is queued) and ``ack_nowait(job)``; ``worker_pool`` then calls them instead of
    awaiting ``claim()``/``ack()``, which saves a coroutine per job.

    A source whose claims cost a round trip or a transaction each may also offer
    ``claim_many(limit)``: wait like ``claim()``, then return between 1 and *limit*
    jobs, each leased to the caller as if claimed alone, or ``[]`` where ``claim()``
    would return ``None``. ``worker_pool`` then claims as many jobs at once as it has
    idle workers, never more: each job it claims starts at once.
    """

    async def claim(self) -> QueuedJob | None: ...

    async def ack(self, job: QueuedJob) -> None: ...

    async def release(self, job: QueuedJob) -> None: ...

    async def fail(self, job: QueuedJob, error: BaseException | str) -> None: ...


def closed_by_owner(source: object) -> bool:
    """True for a source that its owner closed and that reopens only when asked to
    (``open()`` or ``async with``): reading its figures would open it again, or fail."""
    return callable(getattr(source, "open", None)) and getattr(source, "closed", False) is True
