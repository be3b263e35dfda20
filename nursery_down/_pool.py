"""worker_pool(): a ready-made service that runs a JobSource's jobs on N worker tasks."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._context import ServiceContext
from ._exceptions import ConfigurationError
from ._jobs import Job
from ._spec import ServiceFunction
from ._validate import is_async_function, is_count
from .queues._source import JobSource, QueuedJob

logger = logging.getLogger("nursery_down")

#: ``async def handler(job: QueuedJob) -> None``: run one job. Returning means done
#: (the job is acked); raising an exception means this attempt failed (the job is
#: retried, and dead-lettered after the source's ``max_attempts``).
Handler = Callable[[QueuedJob], Awaitable[None]]

# The dashboard info of a first attempt. Shared, so a job costs no dict of its own;
# nothing writes to it.
_FIRST_ATTEMPT: dict[str, Any] = {}


def worker_pool(
    source: JobSource,
    handler: Handler,
    *,
    workers: int = 20,
    name: str | None = None,
) -> ServiceFunction:
    """A service function that runs *source*'s jobs on *workers* concurrent tasks.

    ::

        async def handle(job: QueuedJob) -> None:
            await send_invoice(job.payload)

        sup.add(nd.worker_pool(queue, handle, workers=20), name="invoices")

    *handler* is ``async def handler(job: QueuedJob) -> None``. When it returns,
    the job is acked. When it raises an exception, the job is failed: retried later,
    and dead-lettered after the source's ``max_attempts``; the pool keeps running.

    How it behaves:

    - One producer task claims jobs and hands each to an idle worker through an
      unbuffered channel: nothing is buffered past the workers. At most
      ``workers + 1`` jobs are claimed and not finished (the producer holds the
      next one while every worker is busy). A source with ``claim_many`` (``SQLiteQueue``,
      ``PostgresQueue``) is asked for as many jobs at once as workers are idle, so
      one transaction claims for all of them; while every worker is busy it waits
      for one to be free, so at most ``workers`` jobs are claimed and not finished.
    - A finished job's ack is written behind its worker: the worker hands it to one
      of ``workers`` ack writers and takes its next job while the ack commits (a
      round trip or a transaction on a database), so a claim and an ack are on
      their way at the same time. At most ``workers`` acks wait to be written (a
      worker waits for a free writer beyond that), and the service returns only
      once every ack is written. A source with ``ack_nowait`` (``MemoryQueue``) is
      acked by the worker at once.
    - Each job runs as an in-flight job of the service, like a ``ctx.job()`` block:
      counted, shown on the dashboard, and shielded, so a drain lets it finish.
    - When a drain begins, the producer stops claiming at once and closes the
      channel; a job claimed but not yet started goes back to the source
      (``release``). Running jobs finish, then are acked; the drain ends once
      their acks are written.
    - At the grace deadline, jobs still running are cancelled, counted as
      hard-cancelled and released back to the source (their attempt not counted).
    - ``ack``, ``release`` and ``fail`` are shielded: cancellation never cuts them.
    - A source whose leases can be lost while a job runs (``PostgresQueue``) has the
      job cancelled when that happens: it may already run elsewhere. It counts as
      failed, and its settle changes nothing.
    - The service returns once the source is closed and exhausted (``claim()``
      returned ``None``) and the last job settled.

    *name* names the returned function (the default service name).
    """
    if not isinstance(source, JobSource):
        raise ConfigurationError(
            f"worker_pool needs a job source (claim, ack, release, fail), got "
            f"{type(source).__name__}; use nursery_down.queues.MemoryQueue or SQLiteQueue"
        )
    if not is_async_function(handler):
        raise ConfigurationError(
            f"worker_pool's handler {getattr(handler, '__name__', handler)!r} must be an "
            "async function: async def handler(job) -> None"
        )
    if not is_count(workers):
        raise ConfigurationError(f"workers must be a whole number >= 1, got {workers!r}")

    async def pool(ctx: ServiceContext) -> None:
        await _run_pool(ctx, source, handler, workers)

    _sources[pool] = source
    pool.__name__ = pool.__qualname__ = name or "worker_pool"
    pool.__doc__ = f"A pool of {workers} workers running {getattr(handler, '__name__', 'jobs')}."
    return pool


class _WorkerJob(Job):
    """The in-flight record of one pool worker, registered while it runs a job.

    A worker reuses one record for all of its jobs (registered in the service's
    in-flight jobs for the time of each, with that job's key and start time), and
    it shares the worker's one long-lived shielded cancel scope instead of entering
    a scope per job: a drain moves the job's deadline, which is that scope's
    deadline. Entering a scope per job would cost about a third of a trivial job's
    time, and a record per job would cost an allocation each.
    """

    __slots__ = ()

    def __init__(self, context: ServiceContext, scope: trio.CancelScope) -> None:
        # Job.__init__ is not called: the worker runs the block, not
        # Job.__aenter__/__aexit__, and fills in key, info and started per job.
        self._drain = context._drain
        self._counters = context._counters
        self._service = context.name
        self._scope = scope
        self._host = None
        self._task = trio.lowlevel.current_task()
        self.key = None
        self.info = _FIRST_ATTEMPT
        self.started = math.nan
        self.outcome = "running"


async def _run_pool(ctx: ServiceContext, source: JobSource, handler: Handler, workers: int) -> None:
    send, receive = trio.open_memory_channel[QueuedJob](0)
    # Every worker reads the same receive channel: no clone per worker, as the
    # producer ends them all by closing the send side. One shared task name, too:
    # with 10,000 workers, a clone and a name each would cost about 0.5 KiB a job.
    name = f"{ctx.name} worker"
    # Looked up once and shared by every worker (a bound method each would cost
    # 64 bytes a worker).
    ack_nowait = _fast_path(source, "ack_nowait")
    watch_lease = _fast_path(source, "watch_lease")
    if watch_lease is not None:
        handler = _cancelled_on_lost_lease(handler, watch_lease)
    freed = _Freed()
    claim_many = _fast_path(source, "claim_many")
    # Acks are written behind the workers: a worker hands its finished job to one of
    # as many ack writers and takes its next job while that ack commits (a round trip
    # or a transaction each on a database). The ack writers outlive the workers, so
    # the pool returns only once every ack is written.
    acks_send, acks_receive = trio.open_memory_channel[QueuedJob](0)
    async with acks_receive, trio.open_nursery() as writing:
        if ack_nowait is None:
            for _ in range(workers):
                writing.start_soon(_write_acks, source, acks_receive, name=f"{ctx.name} ack")
        async with acks_send, receive, trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(
                    _work, ctx, source, handler, receive, ack_nowait, acks_send, freed, name=name
                )
            ctx.ready()
            if claim_many is None:
                await _produce(ctx, source, send)
            else:
                await _produce_batches(ctx, source, send, claim_many, freed)


async def _write_acks(source: JobSource, receive: trio.MemoryReceiveChannel[QueuedJob]) -> None:
    """Ack the jobs the workers hand over, until they have all ended.

    Shielded for life, as an ack is never cut: neither a drain nor its grace
    deadline applies to a job that already finished. An ack that fails closes the
    hand-over for every writer before it ends the pool, so that no worker waits for
    ever for a writer: each acks its job itself from then on (see :func:`_work`).
    """
    with trio.CancelScope(shield=True):
        while True:
            try:
                job = await receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return  # the workers are done, or another writer's ack failed
            try:
                await source.ack(job)
            except BaseException:
                receive.close()
                raise


class _Freed:
    """How the workers tell a batch-claiming producer that one of them is free."""

    __slots__ = ("wanted",)

    def __init__(self) -> None:
        #: Set by the producer while every worker is busy; the first worker to
        #: finish its job sets it.
        self.wanted: trio.Event | None = None


async def _produce(
    ctx: ServiceContext, source: JobSource, send: trio.MemorySendChannel[QueuedJob]
) -> None:
    # Closing the send side is the workers' signal to stop: it happens here, on
    # the producer side, the moment the drain cancels the producer.
    claim_nowait = _fast_path(source, "claim_nowait")
    drain = ctx._drain
    async with send, trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_drain, ctx, nursery.cancel_scope)
        while not drain.draining:
            if claim_nowait is None:
                job = await source.claim()
            else:
                try:
                    job = claim_nowait()
                except trio.WouldBlock:
                    job = await source.claim()
            if job is None:  # the source is closed and exhausted
                break
            if drain.began.is_set():  # claimed in the very instant the drain began
                await _shielded(source.release, job)
                break
            try:
                await send.send(job)
            except BaseException:
                # No worker took it (the drain cancelled the hand-over): not started.
                await _shielded(source.release, job)
                raise
        nursery.cancel_scope.cancel()


async def _produce_batches(
    ctx: ServiceContext,
    source: JobSource,
    send: trio.MemorySendChannel[QueuedJob],
    claim_many: Callable[[int], Awaitable[list[QueuedJob]]],
    freed: _Freed,
) -> None:
    """The producer for sources with ``claim_many``: one claim for every idle worker."""
    drain = ctx._drain
    async with send, trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_drain, ctx, nursery.cancel_scope)
        while not drain.draining:
            idle = send.statistics().tasks_waiting_receive
            if not idle:
                # Every worker is busy, or not yet at the channel (as at the start):
                # claim once one is free, for all free by then. (Claiming one ahead
                # instead would cost a claim and, later, an ack of their own for that
                # job: a round trip each on a database.)
                freed.wanted = wanted = trio.Event()
                await wanted.wait()
                freed.wanted = None
                continue
            # The workers waiting on the channel take the jobs at once.
            jobs = await claim_many(idle)
            if not jobs:  # the source is closed and exhausted
                break
            for sent, job in enumerate(jobs):
                if drain.began.is_set():  # claimed in the very instant the drain began
                    await _release_all(source, jobs[sent:])
                    nursery.cancel_scope.cancel()
                    return
                try:
                    await send.send(job)
                except BaseException:
                    # No worker took them (the drain cancelled the hand-over): not started.
                    await _release_all(source, jobs[sent:])
                    raise
        nursery.cancel_scope.cancel()


async def _release_all(source: JobSource, jobs: list[QueuedJob]) -> None:
    """Release *jobs* together (a source that groups its writes commits them as one)."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(source.release, job)


async def _cancel_on_drain(ctx: ServiceContext, scope: trio.CancelScope) -> None:
    await ctx.wait_draining()
    scope.cancel()


async def _work(
    ctx: ServiceContext,
    source: JobSource,
    handler: Handler,
    receive: trio.MemoryReceiveChannel[QueuedJob],
    ack_nowait: Callable[[QueuedJob], None] | None,
    acks: trio.MemorySendChannel[QueuedJob],
    freed: _Freed,
) -> None:
    counters = ctx._counters
    in_flight = counters.in_flight
    drain = ctx._drain
    job_scopes = drain.job_scopes
    now = drain.now
    # One shielded scope for the worker's whole life: only its own deadline (the
    # grace deadline, moved through the job registered while one runs) can cut a
    # job, never a drain or a crashing sibling. Toggling the shield around each job
    # is not needed: between jobs a worker only waits on the channel, and every way
    # the producer ends (drain, exhaustion, crash, cancellation) closes the channel
    # and so ends the idle workers. Not toggling saves ~1.5 us a job (trio
    # recalculates the cancel status on each change).
    with trio.CancelScope(shield=True) as scope:
        job = _WorkerJob(ctx, scope)
        _tell_free(freed)  # at the channel for its first job
        async for queued in receive:
            if drain.draining:
                # Handed over in the instant the drain began: not started, so it
                # goes back rather than starting after the drain.
                await _shielded(source.release, queued)
                continue
            job.key = queued.id
            job.info = _FIRST_ATTEMPT if not queued.attempts else {"attempt": queued.attempts + 1}
            job.started = now()
            in_flight[job] = None
            # While the job runs, the drain moves this scope's deadline with the others.
            job_scopes.add(scope)
            try:
                await handler(queued)
            except Exception as exc:
                del in_flight[job]
                job_scopes.discard(scope)
                counters.failed += 1
                if drain.report is not None:
                    drain.report.job_ended(job, "failed")
                logger.warning(
                    "service %s: job %r failed on attempt %d: %s: %s",
                    ctx.name,
                    queued.id,
                    queued.attempts + 1,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                if scope.deadline == math.inf:
                    await source.fail(queued, exc)
                else:
                    await _settle_after_deadline(scope, source.fail, queued, exc)
            except BaseException:
                del in_flight[job]
                job_scopes.discard(scope)
                if scope.cancel_called:  # only the grace deadline reaches a shielded job
                    counters.hard_cancelled += 1
                else:  # KeyboardInterrupt and the like: still not lost
                    counters.failed += 1
                if drain.report is not None:
                    drain.report.job_ended(job, "released")
                await _shielded(source.release, queued)
                raise
            else:
                del in_flight[job]
                job_scopes.discard(scope)
                counters.completed += 1
                if drain.report is not None:  # one attribute read a job outside drains
                    drain.report.job_ended(job, "finished")
                if ack_nowait is not None:
                    ack_nowait(queued)  # cannot block, so nothing can cut it
                else:
                    try:
                        acks.send_nowait(queued)
                    except (trio.WouldBlock, trio.BrokenResourceError):
                        await _hand_over_ack(scope, acks, source, queued)
            _tell_free(freed)


def _tell_free(freed: _Freed) -> None:
    """Wake a producer that waits for a free worker. The worker goes to the channel
    without a checkpoint after this: the producer, when it runs, finds it waiting."""
    wanted = freed.wanted
    if wanted is not None:
        wanted.set()


async def _hand_over_ack(
    scope: trio.CancelScope,
    acks: trio.MemorySendChannel[QueuedJob],
    source: JobSource,
    job: QueuedJob,
) -> None:
    """Hand *job*'s ack over once an ack writer is free (every one is busy: so at most
    ``workers`` acks wait); if the writers are gone (an ack failed, ending the pool),
    ack it here, as it fails or succeeds on its own."""
    try:
        await _settle_after_deadline(scope, acks.send, job)
    except trio.BrokenResourceError:
        await _settle_after_deadline(scope, source.ack, job)


async def _settle_after_deadline(
    scope: trio.CancelScope, settle: Callable[..., Awaitable[None]], *args: Any
) -> None:
    """Settle a job (fail or ack it, or hand its ack over) once it ended, whether or
    not a drain set its worker's deadline."""
    if scope.cancel_called:
        # The handler outlived the grace deadline by swallowing the cancellation:
        # the worker's scope is cancelled for good, so settle under a fresh shield.
        await _shielded(settle, *args)
        return
    # The job is over and no longer registered: the drain deadline must not cut its
    # ack. (Worker scopes are only ever cancelled through their deadline, so with
    # no deadline the scope stays uncancelled.)
    scope.deadline = math.inf
    await settle(*args)


async def _shielded(settle: Callable[..., Awaitable[None]], *args: Any) -> None:
    with trio.CancelScope(shield=True):
        await settle(*args)


class _LeaseLostError(Exception):
    """A job was cancelled because its source took its lease back."""


def _cancelled_on_lost_lease(
    handler: Handler, watch_lease: Callable[[QueuedJob, Callable[[], None]], None]
) -> Handler:
    """*handler*, cancelled when the source calls back that the job's lease was lost.

    Only for sources that offer ``watch_lease(job, cancel)``: the scope it costs is
    paid by their jobs alone.
    """

    async def run(job: QueuedJob) -> None:
        with trio.CancelScope() as lease:
            watch_lease(job, lease.cancel)
            await handler(job)
        if lease.cancelled_caught:
            raise _LeaseLostError(
                "its lease was lost (the source gave the job back to run elsewhere), "
                "so it was cancelled"
            )

    run.__name__ = getattr(handler, "__name__", "handler")
    return run


def _fast_path(source: JobSource, name: str) -> Callable[..., Any] | None:
    """The source's optional non-blocking variant of an operation, if it has one.

    Calling ``claim_nowait()`` / ``ack_nowait(job)`` instead of awaiting ``claim()`` /
    ``ack(job)`` saves creating and driving a coroutine per job: about a tenth of a
    trivial job's time over an in-memory source.
    """
    method = getattr(source, name, None)
    return method if callable(method) else None


#: The source of each service function worker_pool made (the fleet reports its figures).
_sources: weakref.WeakKeyDictionary[Callable[..., Any], JobSource] = weakref.WeakKeyDictionary()


def sources_of(function: Callable[..., Any]) -> tuple[JobSource, ...]:
    """The job source of a service function made by :func:`worker_pool` (else none)."""
    try:
        source = _sources.get(function)
    except TypeError:  # not weakly referenceable: not one of ours
        return ()
    return () if source is None else (source,)
