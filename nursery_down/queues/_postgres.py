"""PostgresQueue: a job source in PostgreSQL, shared by processes on many machines."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeAlias, TypeVar

import trio

from .._exceptions import (
    ConfigurationError,
    NotLeasedError,
    QueueError,
    QueueSchemaError,
    QueueUnavailableError,
    describe_error,
)
from .._postgresql import describe_dsn, first_line
from .._validate import is_count, require_seconds
from ._source import DeadJob, QueuedJob, QueueStatistics
from ._sqlite import encode_payload

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")

logger = logging.getLogger("nursery_down")

#: The layout of a queue's tables, stored in its ``meta`` table. A newer layout,
#: written by a newer nursery_down, is refused rather than misread.
SCHEMA_VERSION: Final = 1

#: First key of the advisory lock each open queue object holds for its life ("ndq"),
#: the second being its holder number: so that it does not meet another program's locks.
HOLDER_SPACE: Final = 0x6E6471
#: First key of the short locks (creating the tables, sweeping), apart from the holders'.
LOCK_SPACE: Final = HOLDER_SPACE + 1

#: Most jobs one claim statement takes, whatever *limit* ``claim_many`` is given: each
#: costs a lease token made beforehand, spent or not.
MOST_CLAIMED: Final = 100
#: Most calls one grouped statement carries (puts, acks, releases); the rest form the next.
MOST_GROUPED: Final = 500

#: One row of :meth:`PostgresQueue.history`: (job id, event, time, pid, detail), the
#: fields of :class:`nursery_down.testing.JobEvent` in order.
HistoryRow: TypeAlias = tuple[int, str, float, int, str | None]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")

_INSTALL_HINT = "pip install 'nursery-down[postgres]'"


def _import_driver() -> None:
    """Import psycopg and psycopg_pool, or raise a ConfigurationError naming the extra."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"PostgresQueue needs psycopg 3 and psycopg-pool ({exc}); install them with "
            f"{_INSTALL_HINT}"
        ) from None


class PostgresQueue:
    """A durable :class:`JobSource` in PostgreSQL, for fleets of worker processes.

    ::

        queue = PostgresQueue("postgresql://app@db.internal/app", name="invoices")
        await queue.put({"order": 17})
        sup.add(nd.worker_pool(queue, handle), name="invoices")

    Any number of processes, on any number of machines, may use the same queue
    (the same database and *name*): each job is handed to one of them at a time.
    It needs the ``postgres`` extra: ``pip install 'nursery-down[postgres]'``.

    **Tables.** The queue keeps its jobs in tables named ``ndq_<name>_jobs``,
    ``_dead`` (dead letters), ``_history`` and ``_meta`` in the connection's
    schema, and creates them on first open. Their layout is versioned: a layout
    written by a newer nursery_down raises :class:`QueueSchemaError` at open.

    **Claims** take the oldest waiting jobs with ``FOR UPDATE SKIP LOCKED``, so
    processes never wait on each other's claims, and lease each of them: a lease
    token of its own, the holder, and an expiry *lease* seconds later, all on the
    database's clock. ``claim_many(n)`` takes up to *n* jobs in one statement (a
    worker pool asks for as many as it has idle workers); ``claim()`` takes one.
    The jobs run after the claim's transaction committed, never inside it. A claim
    commits without waiting for the disk (puts, acks and fails do wait): a crash of
    the server can forget only the claims of its last instant, whose jobs then run
    again while the first run's settle is fenced.

    **Heartbeat.** While this object holds leases, every *heartbeat* seconds it
    renews them (a new expiry, *lease* seconds on). A lease it finds gone (taken
    back by the sweeper because this process stopped renewing, for instance while
    paused or cut off from the database for longer than *lease*) is **lost**: the
    job may already run elsewhere, and the late ``ack``, ``release`` or ``fail`` of
    it is fenced: it changes nothing in the database, is logged as a warning and
    counted in :attr:`lost_leases`, and raises nothing, so a worker pool keeps
    running. A worker pool also cancels the job's handler when the heartbeat finds
    its lease lost (:meth:`watch_lease`); it counts as failed there.

    **Orphans.** Every *heartbeat* seconds one process of the fleet at a time (by an
    advisory lock) sweeps: a lease that expired goes back to the queue. Each queue
    object also holds a session advisory lock on a connection of its own, which
    PostgreSQL frees as soon as the process dies; a lease whose holder's lock is
    free and that was not renewed for two heartbeats is taken back at once. So the
    jobs of a SIGKILLed process run again elsewhere within about three heartbeats
    (3 s by default); those of a process that is alive but stopped renewing (paused,
    partitioned) after *lease* seconds. For ``2 * lease`` seconds after the server
    restarted, only expiry counts, as every holder is still taking its lock again.
    With *max_lost_leases*, a job taken back from that many holders goes to the dead
    letters, as with :class:`SQLiteQueue`.

    **Wake-up.** ``put`` sends a ``NOTIFY``; an idle ``claim`` listening on its own
    connection wakes at once. Notifications are lost while that connection is down,
    so an idle claim also looks every *poll_interval* seconds.

    **Attempts.** ``fail()`` counts an attempt and dead-letters the job after
    *max_attempts*; ``release()`` and the sweeper do not count one.

    **Bounded tables.** An acked job is deleted, or, with *keep_done* seconds, kept
    (state ``done``) that long and then deleted by the sweeper. History rows older
    than *keep_history* seconds are deleted too (None keeps them).

    **History.** Every enqueue, claim, ack, release, fail, dead letter and recovery
    is written to the ``history`` table in the same transaction as the change, with
    the database's time and the writing process's pid; :meth:`history` reads it.

    **Grouped writes.** ``put``, ``ack`` and ``release`` calls made at the same
    moment by the tasks of one queue object go to the database together: one
    statement, one commit, for all of them. Each call still returns only once its
    own write committed, with its own outcome (its id; a fenced settle is fenced for
    that job alone), and a call that arrives while a group is being written joins
    the next one. A ``put_many`` is a transaction of its own.

    **Connections.** Each call runs in a worker thread through a psycopg connection
    pool of *pool_size* connections, plus one connection for LISTEN and the
    holder's lock. A dropped connection is replaced; a call that met one is tried
    once more on a fresh connection when that cannot do anything twice. A server
    that cannot be reached within *connect_timeout* seconds raises
    :class:`QueueUnavailableError` saying which host and what to check.

    Payloads are stored as JSON, as with :class:`SQLiteQueue`; anything else raises
    :class:`PayloadError`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        name: str = "default",
        max_attempts: int = 5,
        max_lost_leases: int | None = None,
        lease: float = 30.0,
        heartbeat: float = 1.0,
        poll_interval: float = 1.0,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        keep_done: float = 0.0,
        keep_history: float | None = 7 * 24 * 3600.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError(
                f"dsn must be a PostgreSQL connection string such as "
                f"'postgresql://user@host/dbname', got {dsn!r}"
            )
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                f"name must be 1-40 lowercase letters, digits or '_', starting with a "
                f"letter (it names the queue's tables), got {name!r}"
            )
        if not is_count(max_attempts):
            raise ConfigurationError(
                f"max_attempts must be a whole number >= 1, got {max_attempts!r}"
            )
        if max_lost_leases is not None and not is_count(max_lost_leases):
            raise ConfigurationError(
                f"max_lost_leases must be a whole number >= 1, or None for no limit, "
                f"got {max_lost_leases!r}"
            )
        if not is_count(pool_size) or pool_size > 32:
            raise ConfigurationError(
                f"pool_size must be a whole number from 1 to 32 (each connection's calls "
                f"run in a thread, within trio's thread limit of 40), got {pool_size!r}"
            )
        self.lease = require_seconds("lease", lease, positive=True)
        self.heartbeat = require_seconds("heartbeat", heartbeat, positive=True)
        if self.heartbeat * 3 > self.lease:
            raise ConfigurationError(
                f"heartbeat ({heartbeat!r} s) must be at most a third of lease ({lease!r} s), "
                "so that a lease is renewed several times before it could expire"
            )
        self.poll_interval = require_seconds("poll_interval", poll_interval, positive=True)
        self.connect_timeout = require_seconds("connect_timeout", connect_timeout, positive=True)
        # How long one try of a settle waits for a connection (twice at most, when the
        # first it got was broken): a few tries fit in a lease.
        self._settle_wait = min(self.connect_timeout, self.lease / 5)
        self.keep_done = require_seconds("keep_done", keep_done)
        self.keep_history = (
            None if keep_history is None else require_seconds("keep_history", keep_history)
        )
        _import_driver()
        self.dsn = dsn
        self.name = name
        self.max_attempts = max_attempts
        self.max_lost_leases = max_lost_leases
        self.pool_size = pool_size
        self._sql = _Statements(name)
        # Calls of the same kind waiting at the same moment share one statement and one
        # commit: the durable commit is most of what a put or an ack costs, and the
        # hop to a worker thread much of the rest.
        self._puts = _Group(self._send_puts, cancellable=True)
        self._acks = _Group(self._send_acks, cancellable=False)
        self._releases = _Group(self._send_releases, cancellable=False)
        self._where = describe_dsn(dsn)
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._limiter: trio.CapacityLimiter | None = None
        # Claims have a thread and a connection of their own: a worker pool's one
        # producer must not wait behind its twenty workers' acks to hand out the next job.
        self._claim_limiter: trio.CapacityLimiter | None = None
        self._open_lock: trio.Lock | None = None
        self._wakeup: trio.Event | None = None
        self._closed = False
        self._keeper: trio.CancelScope | None = None
        self._keeper_done: trio.Event | None = None
        # Leases held through this object: id(job) -> (job, lease token). Keyed by the
        # object handed out, so a job claimed again after a lost lease is a new entry.
        self._held: dict[int, tuple[QueuedJob, uuid.UUID]] = {}
        self._lost: set[uuid.UUID] = set()
        # What to call when a running job's lease is found lost: id(job) -> cancel.
        self._watchers: dict[int, Callable[[], None]] = {}
        self._lost_count = 0
        # The holder: one number per open queue object, whose advisory lock (held on
        # the listening connection) tells the fleet that this object still runs.
        self._holder = 0
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._listening = False
        self._unreachable = False
        # Claims whose statement is on its way, and what a close waits on for them.
        self._claiming = 0
        self._claims_over: trio.Event | None = None

    # -- opening and closing ------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or check the tables, and start the heartbeat and listener.

        Called by the first operation if not called before. Raises
        :class:`QueueUnavailableError` when the server cannot be reached and
        :class:`QueueSchemaError` when the tables were written by a newer
        nursery_down. A closed queue opens again, as the service owning it does when
        it restarts; jobs claimed before the close were released and cannot be
        settled through it any more.
        """
        if self._open_lock is None:
            self._open_lock = trio.Lock()
            self._limiter = trio.CapacityLimiter(self.pool_size)
            self._claim_limiter = trio.CapacityLimiter(1)
        async with self._open_lock:
            if self._pool is not None:
                return
            self._closed = False
            self._pid = os.getpid()
            self._holder = random.randrange(1, 2**31)
            self._pool = await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
            self._keeper = trio.CancelScope()
            self._keeper_done = trio.Event()
            # A system task, so that a queue opened lazily (by its first claim) keeps
            # its leases alive however the caller's tasks are arranged.
            trio.lowlevel.spawn_system_task(
                self._keep, self._keeper, self._keeper_done, name=f"PostgresQueue {self.name}"
            )

    async def aclose(self) -> None:
        """Stop the heartbeat and listener, release the jobs still leased through this
        object (unstarted, attempt not counted), and close the connections. Claims
        return ``None`` from now on."""
        if self._closed or self._pool is None or self._open_lock is None:
            self._closed = True
            self._wake()
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._wake()
        with trio.CancelScope(shield=True):
            # A claim on its way when the close began leaves its jobs held here, to be
            # released below with the rest.
            while self._claiming:
                self._claims_over = trio.Event()
                await self._claims_over.wait()
            async with self._open_lock:
                if self._keeper is not None and self._keeper_done is not None:
                    self._keeper.cancel()
                    await self._keeper_done.wait()
                pool = self._pool
                held = list(self._held.values())
                self._held.clear()
                self._lost.clear()
                self._watchers.clear()
                try:
                    if held:
                        await self._call(self._release_all_sync, [token for _job, token in held])
                except QueueError as exc:
                    logger.warning(
                        "PostgresQueue %s: could not release %d jobs at close (%s); the "
                        "sweeper will requeue them when their leases expire",
                        self.name,
                        len(held),
                        exc,
                    )
                finally:
                    self._pool = None
                    if pool is not None:
                        await trio.to_thread.run_sync(pool.close)

    async def __aenter__(self) -> PostgresQueue:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called (until it is opened again)."""
        return self._closed

    @property
    def lost_leases(self) -> int:
        """Leases this object lost (found gone by the heartbeat, or at a settle)."""
        return self._lost_count

    # -- putting ------------------------------------------------------------------------

    async def put(self, payload: Any) -> int:
        """Store a job durably and return its id. *payload* must be JSON-able.

        Puts made at the same moment through this object commit together (see the
        class documentation): if the connection drops while they commit, each raises
        :class:`QueueUnavailableError` and the jobs may or may not be stored.
        """
        text = encode_payload(payload)
        await self._ready()
        return await self._puts.run(text)

    async def put_many(self, payloads: Iterable[Any]) -> list[int]:
        """Store one job per payload in one transaction (all or none); return their ids.

        If the connection drops while the transaction commits, it raises
        :class:`QueueUnavailableError` and the jobs may or may not be stored.
        """
        texts = [encode_payload(payload) for payload in payloads]
        await self._ready()
        if not texts:
            return []
        return await self._call(self._put_sync, texts, retry=False)

    # -- the JobSource protocol ---------------------------------------------------------

    async def claim(self) -> QueuedJob | None:
        """Wait for a job and lease it to this object; ``None`` once this queue is closed."""
        jobs = await self._claim(1)
        return jobs[0] if jobs else None

    async def claim_many(self, limit: int) -> list[QueuedJob]:
        """Wait for a job, then lease up to *limit* waiting jobs to this object at once.

        One statement claims them (at most 100, whatever *limit*), the oldest first,
        each leased as if claimed alone, with a lease token of its own: settle each
        with ``ack``, ``release`` or ``fail``. It returns as soon as one job is
        ready, with those ready at that instant; ``[]`` once this queue is closed.
        Cancelling a waiting call claims nothing, as with ``claim()``.
        """
        if not is_count(limit):
            raise ConfigurationError(
                f"claim_many's limit must be a whole number >= 1 (how many jobs the "
                f"caller can start at once), got {limit!r}"
            )
        return await self._claim(min(limit, MOST_CLAIMED))

    async def _claim(self, limit: int) -> list[QueuedJob]:
        if not self._closed:
            await self._ready()
        while True:
            if self._closed:
                await trio.lowlevel.checkpoint()
                return []
            # Taken before looking, so a notification that lands after the look still wakes us.
            wakeup = self._wakeup_event()
            # A thread call that started always delivers its result (a cancellation
            # waits for it), and nothing checkpoints between it and the return.
            self._claiming += 1
            try:
                try:
                    leased = await self._call(self._claim_sync, limit, limiter=self._claim_limiter)
                except QueueUnavailableError as exc:
                    # The server went away after the queue opened (a restart, a
                    # failover): wait for it, as the pool reconnects, rather than end
                    # the worker pool.
                    self._outage("claims wait", exc)
                    leased = []
                else:
                    self._recovered("claims")
                for job, token in leased:
                    self._held[id(job)] = (job, token)
            finally:
                self._claiming -= 1
                if not self._claiming and self._claims_over is not None:
                    self._claims_over.set()
            if self._was_closed():
                # Closed while the claim ran: hand nothing out. The close, which waited
                # for this claim, releases its jobs with the others held here.
                return []
            if leased:
                return [job for job, _token in leased]
            with trio.move_on_after(self.poll_interval):
                await wakeup.wait()

    async def ack(self, job: QueuedJob) -> None:
        """The job is done: delete it (or mark it done for *keep_done* seconds).

        Fenced on the lease: if the lease was lost meanwhile, nothing changes (see
        the class documentation).
        """
        await self._settle(job, "ack", self._acks.run)

    async def release(self, job: QueuedJob) -> None:
        """Put the job back, unstarted; its attempt is not counted. Fenced on the lease."""
        await self._settle(job, "release", self._releases.run)

    async def fail(self, job: QueuedJob, error: BaseException | str) -> None:
        """Count a failed attempt: requeue the job, or dead-letter it after ``max_attempts``.

        Fenced on the lease.
        """
        await self._settle(job, "fail", self._send_fail, describe_error(error))

    def watch_lease(self, job: QueuedJob, cancel: Callable[[], None]) -> None:
        """Call *cancel()* if the heartbeat finds the lease of *job* lost, until it is settled.

        :func:`nursery_down.worker_pool` uses it to cancel a job that may already run
        elsewhere. If the lease is already lost, *cancel* is called at once.
        """
        entry = self._held.get(id(job))
        if entry is None or entry[0] is not job:
            return  # settled already, or not claimed here: there is no lease to lose
        if entry[1] in self._lost:
            cancel()
        else:
            self._watchers[id(job)] = cancel

    # -- reading and operating ------------------------------------------------------------

    async def statistics(self) -> QueueStatistics:
        """Counts read from the database: the whole fleet's jobs, at one instant."""
        await self._ready()
        return await self._call(self._statistics_sync)

    async def dead_letters(self) -> list[DeadJob]:
        """The jobs that failed ``max_attempts`` times (or lost too many leases), oldest first."""
        await self._ready()
        return await self._call(self._dead_letters_sync)

    async def requeue_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Put dead letters back in the queue with their attempts reset; return how many.

        *ids* picks which (unknown ids are ignored); None requeues them all.
        """
        await self._ready()
        chosen = None if ids is None else [int(i) for i in ids]
        return await self._call(self._requeue_dead_sync, chosen)

    async def purge_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Delete dead letters for good; return how many. None deletes them all."""
        await self._ready()
        chosen = None if ids is None else [int(i) for i in ids]
        return await self._call(self._purge_dead_sync, chosen)

    async def history(self, *, after: int = 0) -> list[HistoryRow]:
        """The history rows, oldest first: ``(job id, event, time, pid, detail)``.

        *after* skips the first rows (a count already read). ``time`` is the
        database's clock, in seconds since the epoch. The chaos checker reads them as
        ``History(events=tuple(JobEvent(*row) for row in rows), pending=...)`` with
        :meth:`pending` as the jobs still waiting.
        """
        await self._ready()
        return await self._call(self._history_sync, after)

    async def pending(self) -> list[int]:
        """The ids of the jobs not yet settled: queued, or leased somewhere."""
        await self._ready()
        return await self._call(self._pending_sync)

    async def sweep(self) -> int:
        """Take back orphaned and expired leases now (see the class documentation);
        return how many jobs went back to the queue or to the dead letters.

        The heartbeat of every open queue does this by itself; returns 0 when another
        process of the fleet is sweeping at this instant.
        """
        await self._ready()
        return await self._call(self._sweep_sync)

    # -- internals: on the trio thread ----------------------------------------------------

    async def _ready(self) -> None:
        if self._pool is None:
            if self._closed:
                raise trio.ClosedResourceError(
                    "this PostgresQueue was closed; open it again with open() or 'async with'"
                )
            await self.open()

    async def _call(
        self,
        function: Callable[..., T],
        *args: Any,
        retry: bool = True,
        limiter: trio.CapacityLimiter | None = None,
        wait: float | None = None,
    ) -> T:
        """Run ``function(connection, *args)`` in a worker thread on a pooled connection.

        With *retry* (the call changes nothing twice: it is fenced on a lease, or only
        reads) a dropped connection gets it a second try on a fresh one; without, only
        when the server said the statement never ran. *wait* bounds the wait for a
        connection (default: the connect timeout).
        """
        assert self._limiter is not None
        if self._pool is None:
            raise trio.ClosedResourceError("this PostgresQueue was closed")
        return await trio.to_thread.run_sync(
            functools.partial(
                self._run, function, args, retry, self.connect_timeout if wait is None else wait
            ),
            limiter=limiter or self._limiter,
        )

    async def _settle(
        self, job: QueuedJob, action: str, send: Callable[..., Awaitable[bool]], *args: Any
    ) -> None:
        entry = self._held.pop(id(job), None)
        if entry is None or entry[0] is not job:
            if entry is not None:
                self._held[id(job)] = entry
            raise NotLeasedError(
                f"cannot {action} job {job.id}: this queue does not hold it as claimed "
                "(was it settled already, or claimed through another PostgresQueue object?)"
            )
        self._watchers.pop(id(job), None)
        token = entry[1]
        if token in self._lost:
            self._lost.discard(token)
            self._fenced(job, action)
            await trio.lowlevel.checkpoint()
            return
        # Settling is never cut half-way: a job acked, released or failed stays so.
        # Acks and releases wait for their group without a cancellation point, so the
        # first try needs no shielded scope: one for each job is a noticeable part of
        # what a trivial job costs.
        settled: bool | None = None
        # Settles wait for a server that is away as long as the lease, from here.
        give_up = trio.current_time() + self.lease
        if action != "fail":  # a fail runs through a thread call, which a cancellation stops
            try:
                settled = await send((job.id, token))
            except QueueUnavailableError as exc:
                self._outage("settles wait", exc)
            else:
                self._recovered("settles")
        if settled is None:
            with trio.CancelScope(shield=True):
                settled = await self._settle_patiently(job, action, send, token, give_up, *args)
        if settled is None:
            return
        if not settled:
            self._lost_count += 1
            self._fenced(job, action)
        elif action != "ack":
            self._wake()

    async def _settle_patiently(
        self,
        job: QueuedJob,
        action: str,
        send: Callable[..., Awaitable[bool]],
        token: uuid.UUID,
        give_up: float,
        *args: Any,
    ) -> bool | None:
        """Settle with ``send((job id, token), *args)``, waiting out an outage of the
        server until *give_up* (a lease from the first try); None if it stayed away
        that long (the lease lapses, the job runs again). A try waits at most twice
        ``_settle_wait`` for a connection, and none starts that could end past *give_up*."""
        while True:
            try:
                settled = await send((job.id, token), *args)
            except QueueUnavailableError as exc:
                now = trio.current_time()
                if now + self.heartbeat + 2 * self._settle_wait > give_up:
                    self._lost_count += 1
                    logger.warning(
                        "PostgresQueue %s: could not %s job %d for %.1f s (%s): its lease "
                        "lapses and the job will run again",
                        self.name,
                        action,
                        job.id,
                        now - (give_up - self.lease),
                        exc,
                    )
                    return None
                self._outage("settles wait", exc)
                await trio.sleep(self.heartbeat)
            else:
                self._recovered("settles")
                return settled

    async def _send_fail(self, lease: tuple[int, uuid.UUID], error: str) -> bool:
        return await self._call(self._fail_sync, *lease, error, wait=self._settle_wait)

    async def _send_puts(self, texts: list[str]) -> list[int]:
        # Not tried again on a dropped connection: the first try may have committed.
        return await self._call(self._put_sync, texts, retry=False)

    async def _send_acks(self, leases: list[tuple[int, uuid.UUID]]) -> list[bool]:
        settled = await self._call(self._ack_sync, leases, wait=self._settle_wait)
        return [token in settled for _id, token in leases]

    async def _send_releases(self, leases: list[tuple[int, uuid.UUID]]) -> list[bool]:
        settled = await self._call(self._release_sync, leases, wait=self._settle_wait)
        return [token in settled for _id, token in leases]

    def _outage(self, what: str, exc: BaseException) -> None:
        """Log the start of an outage once, not at every try."""
        if not self._unreachable:
            self._unreachable = True
            logger.warning("PostgresQueue %s: %s for the server: %s", self.name, what, exc)

    def _recovered(self, what: str) -> None:
        if self._unreachable:
            self._unreachable = False
            logger.warning("PostgresQueue %s: the server answers again; %s go on", self.name, what)

    def _fenced(self, job: QueuedJob, action: str) -> None:
        logger.warning(
            "PostgresQueue %s: %s of job %d changed nothing: this process lost its lease "
            "(it stopped renewing it for longer than the lease of %g s, so the job went "
            "back to the queue and may run elsewhere)",
            self.name,
            action,
            job.id,
            self.lease,
        )

    def _was_closed(self) -> bool:
        # A method, so that a check after an await is not narrowed away by one before it.
        return self._closed

    def _wakeup_event(self) -> trio.Event:
        if self._wakeup is None:
            self._wakeup = trio.Event()
        return self._wakeup

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def _keep(self, scope: trio.CancelScope, done: trio.Event) -> None:
        """The heartbeat, sweeper and listener of one open queue (a system task)."""
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen_forever)
                    nursery.start_soon(self._beat_forever)
        finally:
            done.set()

    async def _beat_forever(self) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            try:
                await self._renew()
                if await self._call(self._sweep_sync):
                    self._wake()
            except Exception as exc:  # a system task must never crash the program
                self._outage("the heartbeat waits", exc)
            else:
                self._recovered("heartbeats")

    async def _renew(self) -> None:
        tokens = [token for _job, token in self._held.values() if token not in self._lost]
        if not tokens:
            return
        ids = [job.id for job, token in self._held.values() if token not in self._lost]
        kept = await self._call(self._renew_sync, ids, tokens)
        sent = set(tokens)
        # A job settled while the renewal ran has left _held: it is not lost.
        for job, token in list(self._held.values()):
            if token in sent and token not in kept and token not in self._lost:
                self._lost.add(token)
                self._lost_count += 1
                cancel = self._watchers.pop(id(job), None)
                if cancel is not None:
                    cancel()
                logger.warning(
                    "PostgresQueue %s: the lease of job %d was lost (not renewed within %g s); "
                    "it may run elsewhere: a worker pool cancels it, and its settle changes "
                    "nothing",
                    self.name,
                    job.id,
                    self.lease,
                )

    async def _listen_forever(self) -> None:
        while True:
            connection = None
            try:
                assert self._limiter is not None
                connection = await trio.to_thread.run_sync(self._listen_sync, limiter=self._limiter)
                self._listening = True
                # Notifications sent while we were away are lost: look once now.
                self._wake()
                while True:
                    await trio.lowlevel.wait_readable(connection.fileno())
                    connection.pgconn.consume_input()
                    notified = False
                    while connection.pgconn.notifies() is not None:
                        notified = True
                    if notified:
                        self._wake()
            except Exception as exc:  # a system task must never crash the program
                if self._listening:
                    logger.warning(
                        "PostgresQueue %s: lost the listening connection (%s); claims poll "
                        "every %g s until it is back",
                        self.name,
                        first_line(exc, self.dsn),
                        self.poll_interval,
                    )
            finally:
                self._listening = False
                if connection is not None:
                    connection.close()
            await trio.sleep(self.heartbeat / 2)

    # -- internals: in a worker thread ----------------------------------------------------

    def _run(
        self, function: Callable[..., T], args: tuple[Any, ...], retry: bool, wait: float
    ) -> T:
        import psycopg
        import psycopg_pool

        pool = self._pool
        if pool is None:
            raise trio.ClosedResourceError("this PostgresQueue was closed")
        for attempt in (1, 2):
            try:
                with pool.connection(timeout=wait) as connection:
                    return function(connection, *args)
            except psycopg_pool.PoolTimeout as exc:
                raise self._unavailable(exc) from None
            except psycopg.OperationalError as exc:
                # A server restart leaves every idle pooled connection broken: drop them.
                pool.check()
                if attempt == 2 or not (retry or exc.sqlstate in _NEVER_RAN):
                    raise self._unavailable(exc) from None
            except psycopg.Error as exc:
                raise QueueError(
                    f"PostgreSQL queue {self.name!r} at {self._where}: {first_line(exc, self.dsn)}"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, exc: BaseException) -> QueueUnavailableError:
        return QueueUnavailableError(
            f"cannot reach the PostgreSQL server of queue {self.name!r} at {self._where} "
            f"({first_line(exc, self.dsn)}); check that the server runs and accepts connections "
            "from this host, and that the DSN's host, port, database, user and password "
            "are right"
        )

    def _open_sync(self) -> psycopg_pool.ConnectionPool[Any]:
        import psycopg
        import psycopg_pool

        # One connection first: its error says why, where a pool would only time out.
        try:
            connection = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, math.ceil(self.connect_timeout))
            )
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"invalid PostgreSQL DSN for queue {self.name!r}: {first_line(exc, self.dsn)}; "
                "write it as 'postgresql://user:password@host:port/dbname' or 'host=... dbname=...'"
            ) from None
        try:
            with connection:
                self._prepare(connection)
        except psycopg.Error as exc:
            raise QueueError(
                f"cannot set up PostgreSQL queue {self.name!r} at {self._where}: "
                f"{first_line(exc, self.dsn)}; check that the user may create tables in the "
                "connection's schema"
            ) from None
        pool = psycopg_pool.ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size + 1,  # one for claims
            kwargs={"autocommit": True},
            open=False,
            timeout=self.connect_timeout,
            # The pool backs off between attempts to reconnect (1 s, 2 s, ...); after a
            # long outage that would keep the queue waiting long after the server came
            # back. Giving an attempt up after 5 s lets the next call start a fresh one.
            reconnect_timeout=5.0,
            name=f"nursery_down {self.name}",
        )
        pool.open()
        return pool

    def _prepare(self, connection: psycopg.Connection[Any]) -> None:
        sql = self._sql
        with connection.transaction():
            # One creator at a time across the fleet: concurrent CREATE TABLE IF NOT
            # EXISTS can still collide.
            connection.execute("SELECT pg_advisory_xact_lock(%s::int, 1)", (LOCK_SPACE,))
            exists = connection.execute("SELECT to_regclass(%s)", (sql.meta,)).fetchone()
            if exists is None or exists[0] is None:
                for statement in sql.schema:
                    connection.execute(statement)
                connection.execute(
                    f"INSERT INTO {sql.meta} (key, value) VALUES ('schema_version', %s)",
                    (str(SCHEMA_VERSION),),
                )
                return
            row = connection.execute(
                f"SELECT value FROM {sql.meta} WHERE key = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
            if version != SCHEMA_VERSION:
                newer = version is not None and version > SCHEMA_VERSION
                raise QueueSchemaError(
                    f"the tables of PostgreSQL queue {self.name!r} at {self._where} have "
                    f"layout version {version if version is not None else 'unknown'}, this "
                    f"nursery_down reads version {SCHEMA_VERSION}; "
                    + (
                        "upgrade nursery_down on this machine to the version the rest of "
                        "the fleet runs"
                        if newer
                        else f"they were not written by nursery_down: give the queue "
                        f"another name= than {self.name!r}"
                    )
                )

    def _listen_sync(self) -> psycopg.Connection[Any]:
        import psycopg

        try:
            connection = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, math.ceil(self.connect_timeout))
            )
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        try:
            row = connection.execute(
                "SELECT pg_try_advisory_lock(%s::int, %s::int)", (HOLDER_SPACE, self._holder)
            ).fetchone()
            if row is None or not row[0]:
                raise QueueError(
                    f"holder lock {self._holder} of queue {self.name!r} is held by another "
                    "connection"
                )
            connection.execute(f"LISTEN {self._sql.channel}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _put_sync(self, connection: psycopg.Connection[Any], texts: list[str]) -> list[int]:
        # One statement (its own transaction): the jobs, their history and the NOTIFY.
        rows = connection.execute(self._sql.put, {"payloads": texts, "pid": self._pid}).fetchall()
        return sorted(row[0] for row in rows)

    def _claim_sync(
        self, connection: psycopg.Connection[Any], limit: int
    ) -> list[tuple[QueuedJob, uuid.UUID]]:
        # A token per job rather than one per statement: the heartbeat then finds each
        # lease kept or lost on its own, and a job claimed here again after its lease
        # was lost is told apart from its first claim. One read of the system's random
        # source for all of them: uuid4() reads it once a token.
        random_bytes = os.urandom(16 * limit)
        tokens = [
            uuid.UUID(bytes=random_bytes[16 * n : 16 * n + 16], version=4) for n in range(limit)
        ]
        rows = connection.execute(
            self._sql.claim,
            {
                "limit": limit,
                "tokens": tokens,
                "holder": self._holder,
                "pid": self._pid,
                "host": self._host,
                "lease": self.lease,
            },
        ).fetchall()
        return [(QueuedJob(row[0], row[1], row[2]), row[3]) for row in rows]

    def _ack_sync(
        self, connection: psycopg.Connection[Any], leases: list[tuple[int, uuid.UUID]]
    ) -> set[uuid.UUID]:
        """Ack a group of leases in one statement; return the tokens of those acked."""
        statement = self._sql.ack_keep if self.keep_done else self._sql.ack
        rows = connection.execute(
            statement,
            {
                "ids": [job_id for job_id, _token in leases],
                "tokens": [token for _job_id, token in leases],
                "pid": self._pid,
                "shard": random.randrange(16),
            },
        ).fetchall()
        return {row[0] for row in rows}

    def _release_sync(
        self, connection: psycopg.Connection[Any], leases: list[tuple[int, uuid.UUID]]
    ) -> set[uuid.UUID]:
        """Release a group of leases in one statement; return the tokens of those released."""
        rows = connection.execute(
            self._sql.release,
            {
                "ids": [job_id for job_id, _token in leases],
                "tokens": [token for _job_id, token in leases],
                "pid": self._pid,
            },
        ).fetchall()
        return {row[0] for row in rows}

    def _release_all_sync(
        self, connection: psycopg.Connection[Any], tokens: list[uuid.UUID]
    ) -> int:
        row = connection.execute(
            self._sql.release_tokens,
            {"tokens": tokens, "pid": self._pid, "detail": "queue closed"},
        ).fetchall()
        return len(row)

    def _fail_sync(
        self, connection: psycopg.Connection[Any], job_id: int, token: uuid.UUID, error: str
    ) -> bool:
        sql = self._sql
        with connection.transaction():
            row = connection.execute(
                f"SELECT attempts FROM {sql.jobs}"
                " WHERE id = %s AND state = 'leased' AND lease_token = %s FOR UPDATE",
                (job_id, token),
            ).fetchone()
            if row is None:
                return False
            attempts = row[0] + 1
            self._log(connection, [job_id], "fail", error)
            if attempts >= self.max_attempts:
                self._dead_letter(connection, [(job_id, error)], attempts_now=attempts)
            else:
                connection.execute(
                    f"UPDATE {sql.jobs} SET state = 'queued', attempts = %s, last_error = %s,"
                    f" {_NO_LEASE} WHERE id = %s",
                    (attempts, error, job_id),
                )
                connection.execute(f"NOTIFY {sql.channel}")
        return True

    def _renew_sync(
        self, connection: psycopg.Connection[Any], ids: list[int], tokens: list[uuid.UUID]
    ) -> set[uuid.UUID]:
        rows = connection.execute(
            self._sql.renew, {"ids": ids, "tokens": tokens, "lease": self.lease}
        ).fetchall()
        return {row[0] for row in rows}

    def _sweep_sync(self, connection: psycopg.Connection[Any]) -> int:
        sql = self._sql
        with connection.transaction():
            row = connection.execute(
                "SELECT pg_try_advisory_xact_lock(%s::int, %s::int)", (LOCK_SPACE, sql.sweep_key)
            ).fetchone()
            if row is None or not row[0]:
                return 0  # another process is sweeping right now
            recovered = connection.execute(
                sql.recover, {"silence": 2 * self.heartbeat, "ns": HOLDER_SPACE}
            ).fetchall()
            if recovered:
                connection.cursor().executemany(
                    f"INSERT INTO {sql.history} (job_id, event, time, pid, detail)"
                    " VALUES (%s, 'recover', extract(epoch from now()), %s, %s)",
                    [
                        (job_id, self._pid, f"lease of pid {pid} on {host}, {why}")
                        for job_id, _lost, pid, host, why in recovered
                    ],
                )
                if self.max_lost_leases is not None:
                    doomed = [
                        (
                            job_id,
                            f"its process died while running it, {lost} times "
                            f"(the last was pid {pid} on {host})",
                        )
                        for job_id, lost, pid, host, _why in recovered
                        if lost >= self.max_lost_leases
                    ]
                    if doomed:
                        self._dead_letter(connection, doomed)
                connection.execute(f"NOTIFY {sql.channel}")
            if self.keep_done:
                connection.execute(
                    f"DELETE FROM {sql.jobs} WHERE state = 'done'"
                    " AND done_at < now() - make_interval(secs => %s)",
                    (self.keep_done,),
                )
            if self.keep_history is not None:
                connection.execute(
                    f"DELETE FROM {sql.history}"
                    " WHERE time < extract(epoch from now()) - %s::float8",
                    (self.keep_history,),
                )
        return len(recovered)

    def _dead_letter(
        self,
        connection: psycopg.Connection[Any],
        jobs: list[tuple[int, str]],
        *,
        attempts_now: int | None = None,
    ) -> None:
        """Move jobs to the dead letters, in the caller's transaction."""
        sql = self._sql
        for job_id, error in jobs:
            connection.execute(
                f"WITH gone AS (DELETE FROM {sql.jobs} WHERE id = %(id)s"
                "  RETURNING id, payload, attempts, lost_leases, enqueued_at)"
                f" INSERT INTO {sql.dead}"
                " (id, payload, attempts, lost_leases, error, enqueued_at, died_at)"
                " SELECT id, payload, coalesce(%(attempts)s::int, attempts), lost_leases,"
                " %(error)s, enqueued_at, now() FROM gone",
                {"id": job_id, "attempts": attempts_now, "error": error},
            )
        self._log(connection, [job_id for job_id, _ in jobs], "dead", [e for _, e in jobs])

    def _log(
        self,
        connection: psycopg.Connection[Any],
        ids: list[int],
        event: str,
        detail: str | list[str] | None = None,
    ) -> None:
        details = detail if isinstance(detail, list) else [detail] * len(ids)
        connection.execute(
            f"INSERT INTO {self._sql.history} (job_id, event, time, pid, detail)"
            " SELECT job_id, %s, extract(epoch from now()), %s, detail"
            " FROM unnest(%s::bigint[], %s::text[]) AS t(job_id, detail)",
            (event, self._pid, ids, details),
        )

    def _statistics_sync(self, connection: psycopg.Connection[Any]) -> QueueStatistics:
        sql = self._sql
        # One statement, so the four numbers belong to the same instant.
        row = connection.execute(
            f"SELECT (SELECT count(*) FROM {sql.jobs} WHERE state = 'queued'),"
            f" (SELECT count(*) FROM {sql.jobs} WHERE state = 'leased'),"
            f" (SELECT coalesce(sum(done), 0) FROM {sql.counters}),"
            f" (SELECT count(*) FROM {sql.dead})"
        ).fetchone()
        assert row is not None
        return QueueStatistics(
            queued=int(row[0]), leased=int(row[1]), done=int(row[2]), dead=int(row[3])
        )

    def _dead_letters_sync(self, connection: psycopg.Connection[Any]) -> list[DeadJob]:
        rows = connection.execute(
            f"SELECT id, payload, attempts, error, extract(epoch from died_at)::float8"
            f" FROM {self._sql.dead} ORDER BY died_at, id"
        ).fetchall()
        return [
            DeadJob(job_id, payload, attempts, error, died)
            for job_id, payload, attempts, error, died in rows
        ]

    def _requeue_dead_sync(self, connection: psycopg.Connection[Any], ids: list[int] | None) -> int:
        sql = self._sql
        with connection.transaction():
            rows = connection.execute(
                f"WITH back AS (DELETE FROM {sql.dead}"
                "  WHERE %(all)s OR id = ANY(%(ids)s::bigint[]) RETURNING id, payload, enqueued_at)"
                f" INSERT INTO {sql.jobs} (id, payload, state, enqueued_at)"
                " SELECT id, payload, 'queued', enqueued_at FROM back RETURNING id",
                {"all": ids is None, "ids": ids or []},
            ).fetchall()
            moved = [row[0] for row in rows]
            if moved:
                self._log(connection, moved, "enqueue", "requeued from the dead letters")
                connection.execute(f"NOTIFY {sql.channel}")
        return len(moved)

    def _purge_dead_sync(self, connection: psycopg.Connection[Any], ids: list[int] | None) -> int:
        cursor = connection.execute(
            f"DELETE FROM {self._sql.dead} WHERE %(all)s OR id = ANY(%(ids)s::bigint[])",
            {"all": ids is None, "ids": ids or []},
        )
        return cursor.rowcount

    def _history_sync(self, connection: psycopg.Connection[Any], after: int) -> list[HistoryRow]:
        rows = connection.execute(
            f"SELECT job_id, event, time, pid, detail FROM {self._sql.history}"
            " ORDER BY seq OFFSET %s",
            (after,),
        ).fetchall()
        return [(int(a), str(b), float(c), int(d), e) for a, b, c, d, e in rows]

    def _pending_sync(self, connection: psycopg.Connection[Any]) -> list[int]:
        rows = connection.execute(
            f"SELECT id FROM {self._sql.jobs} WHERE state IN ('queued', 'leased') ORDER BY id"
        ).fetchall()
        return [int(row[0]) for row in rows]


class _Waiting(Generic[A, R]):
    """One call waiting in a :class:`_Group`, and what it gets back."""

    __slots__ = ("error", "item", "lead", "result", "settled", "taken", "task")

    def __init__(self, item: A) -> None:
        self.item = item
        self.task = trio.lowlevel.current_task()
        self.lead = False  # the lead passed to it: it sends the next statement
        self.taken = False  # part of a statement on its way
        self.settled = False
        self.result: R | None = None
        self.error: BaseException | None = None


class _Group(Generic[A, R]):
    """Calls that wait at the same moment, sent to the database as one statement.

    ``await run(item)`` returns the result *send* gives for *item*. A call made
    while none of the group's statements is on its way leads: it lets the tasks
    already runnable queue their calls behind its own, then sends all of them
    (:data:`MOST_GROUPED` at most) with one ``send(items)``, so one thread hop, one
    round trip and one commit for all, and hands each its own result (or *send*'s
    error to every one). Calls made while that statement is on its way queue up;
    when it is done, the first of them leads the next. So a call returns only once
    its own statement committed, the busier the queue object the larger the
    groups, and a lone call goes at once, with no timer.

    One statement at a time: two on their way at once made groups half as large
    and, with the thread and round trip each costs, were slower on the whole.

    With *cancellable*, a call cancelled while queued is dropped unsent; once its
    statement is on its way, or the lead passed to it, it waits for the outcome, as
    a thread call that started does. Without, no call is ever cut short: as if
    shielded, without the cost of a cancel scope for each.
    """

    __slots__ = ("_busy", "_cancellable", "_queued", "_send")

    def __init__(self, send: Callable[[list[A]], Awaitable[list[R]]], *, cancellable: bool) -> None:
        self._send = send
        self._cancellable = cancellable
        self._queued: deque[_Waiting[A, R]] = deque()
        # A call leads: gathering its group, waiting for its statement, or handed the
        # lead and yet to wake up. Calls arriving meanwhile queue behind it.
        self._busy = False

    async def run(self, item: A) -> R:
        waiting = _Waiting[A, R](item)
        self._queued.append(waiting)
        if self._busy:

            def abort(_: Any) -> trio.lowlevel.Abort:
                if self._cancellable and not (waiting.taken or waiting.lead):
                    self._queued.remove(waiting)
                    return trio.lowlevel.Abort.SUCCEEDED
                return trio.lowlevel.Abort.FAILED

            # Rescheduled once settled, or when the lead passes to it.
            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            self._busy = True
        if not waiting.settled:
            await self._lead(waiting)
        if waiting.error is not None:
            raise waiting.error
        return waiting.result  # type: ignore[return-value]  # R, set with settled

    async def _lead(self, own: _Waiting[A, R]) -> None:
        """Gather the queued calls behind *own* (the first), send them, settle them."""
        group: list[_Waiting[A, R]] = []
        try:
            with trio.CancelScope(shield=True):
                # Passes of the scheduler first, until two in a row bring no call:
                # tasks already runnable (workers ending their jobs at the same
                # instant, or handed theirs one after the other) queue behind ours.
                # Two, as trio runs the tasks of a pass in either order (one let
                # groups break up, three gathered no more). A pass costs microseconds;
                # a statement, a millisecond or more.
                quiet = 0
                while quiet < 2 and len(self._queued) < MOST_GROUPED:
                    seen = len(self._queued)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    quiet = quiet + 1 if len(self._queued) == seen else 0
                while self._queued and len(group) < MOST_GROUPED:
                    waiting = self._queued.popleft()
                    waiting.taken = True
                    group.append(waiting)
                try:
                    results = await self._send([waiting.item for waiting in group])
                except BaseException as exc:
                    for waiting in group:
                        waiting.error = exc
                else:
                    for waiting, result in zip(group, results, strict=True):
                        waiting.result = result
        finally:
            for waiting in group:
                waiting.settled = True
                if waiting is not own:  # the others are parked in run()
                    trio.lowlevel.reschedule(waiting.task)
            if not own.taken:  # something (not send: it is caught) raised before it went
                self._queued.remove(own)
            if self._queued:
                # The lead passes on and _busy stays set: a call arriving before the
                # next leader wakes joins its group rather than sending one of its own.
                following = self._queued[0]
                following.lead = True
                trio.lowlevel.reschedule(following.task)
            else:
                self._busy = False


_NO_LEASE = (
    "lease_token = NULL, lease_holder = NULL, lease_pid = NULL, lease_host = NULL,"
    " leased_at = NULL, renewed_at = NULL, lease_expires = NULL"
)


#: SQLSTATEs of a session the server ended before running the statement sent: a
#: restart or shutdown (admin_shutdown, crash_shutdown, cannot_connect_now).
_NEVER_RAN: Final = frozenset({"57P01", "57P02", "57P03"})


class _Statements:
    """The SQL of one queue: table names are fixed by its (checked) name."""

    def __init__(self, name: str) -> None:
        prefix = f"ndq_{name}"
        self.jobs = jobs = f"{prefix}_jobs"
        self.dead = dead = f"{prefix}_dead"
        self.history = history = f"{prefix}_history"
        self.meta = meta = f"{prefix}_meta"
        self.counters = counters = f"{prefix}_counters"
        self.channel = prefix
        # The sweeper's lock: one per queue name, the same in every process.
        self.sweep_key = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "big") % (2**31 - 2) + 2
        self.schema = [
            f"""CREATE TABLE {jobs} (
                id            bigserial PRIMARY KEY,   -- never reused: history refers to it
                payload       json        NOT NULL,
                state         text        NOT NULL CHECK (state IN ('queued', 'leased', 'done')),
                attempts      integer     NOT NULL DEFAULT 0,   -- failed attempts so far
                lost_leases   integer     NOT NULL DEFAULT 0,   -- times taken back by the sweeper
                enqueued_at   timestamptz NOT NULL DEFAULT now(),
                lease_token   uuid,                             -- fences every settle
                lease_holder  integer,                          -- the holder's advisory lock
                lease_pid     integer,
                lease_host    text,
                leased_at     timestamptz,
                renewed_at    timestamptz,                      -- the last heartbeat
                lease_expires timestamptz,
                done_at       timestamptz,
                last_error    text
            )""",
            f"CREATE INDEX {jobs}_queued ON {jobs} (id) WHERE state = 'queued'",
            f"CREATE INDEX {jobs}_leased ON {jobs} (lease_expires) WHERE state = 'leased'",
            f"CREATE INDEX {jobs}_done ON {jobs} (done_at) WHERE state = 'done'",
            f"""CREATE TABLE {dead} (
                id          bigint      PRIMARY KEY,
                payload     json        NOT NULL,
                attempts    integer     NOT NULL,
                lost_leases integer     NOT NULL,
                error       text        NOT NULL,
                enqueued_at timestamptz NOT NULL,
                died_at     timestamptz NOT NULL
            )""",
            f"""CREATE TABLE {history} (
                seq    bigserial PRIMARY KEY,
                job_id bigint  NOT NULL,
                event  text    NOT NULL,  -- enqueue, claim, ack, release, fail, dead, recover
                time   float8  NOT NULL,  -- the database's clock, seconds since the epoch
                pid    integer NOT NULL,  -- the process that wrote it
                detail text               -- fail and dead: the error; recover: whose lease
            )""",
            f"CREATE INDEX {history}_time ON {history} USING brin (time)",
            # Acks add to one of 16 rows, so concurrent acks seldom wait on each other.
            f"CREATE TABLE {counters} (shard integer PRIMARY KEY, done bigint NOT NULL)",
            f"INSERT INTO {counters} SELECT shard, 0 FROM generate_series(0, 15) AS shard",
            f"CREATE TABLE {meta} (key text PRIMARY KEY, value text NOT NULL)",
        ]
        log = f"INSERT INTO {history} (job_id, event, time, pid, detail)"
        self.put = (
            f"WITH new AS (INSERT INTO {jobs} (payload, state)"
            "  SELECT p::json, 'queued'"
            "  FROM unnest(%(payloads)s::text[]) WITH ORDINALITY AS t(p, n)"
            "  ORDER BY n RETURNING id),"
            f" logged AS ({log} SELECT id, 'enqueue', extract(epoch from now()), %(pid)s, NULL"
            "  FROM new)"
            f" SELECT id, pg_notify('{self.channel}', '') FROM new"
        )
        # set_config(..., true) lasts for this statement's own transaction: this commit
        # does not wait for the disk. A claim lost to a crash only hands the job out again.
        # Each job gets its own token from %(tokens)s, in id order.
        self.claim = (
            f"WITH next AS (SELECT id FROM {jobs} WHERE state = 'queued'"
            "  ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED),"
            " numbered AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM next),"
            f" claimed AS (UPDATE {jobs} j SET state = 'leased',"
            "  lease_token = (%(tokens)s::uuid[])[numbered.n],"
            "  lease_holder = %(holder)s, lease_pid = %(pid)s, lease_host = %(host)s,"
            "  leased_at = now(), renewed_at = now(),"
            "  lease_expires = now() + make_interval(secs => %(lease)s)"
            "  FROM numbered WHERE j.id = numbered.id"
            "  RETURNING j.id, j.payload, j.attempts, j.lease_token),"
            f" logged AS ({log} SELECT id, 'claim', extract(epoch from now()), %(pid)s, NULL"
            "  FROM claimed)"
            " SELECT id, payload, attempts, lease_token,"
            " set_config('synchronous_commit', 'off', true) FROM claimed ORDER BY id"
        )
        # The leases of a group of settles (%(ids)s and %(tokens)s pair up) that are
        # still held, locked in id order: the heartbeat's renewal locks in the same
        # order, so the two never wait on each other in a cycle. A lease that was lost
        # meanwhile does not match: its settle changes nothing.
        mine = (
            f"mine AS (SELECT j.id, t.token FROM {jobs} j"
            "  JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS t(id, token)"
            "  ON j.id = t.id AND j.lease_token = t.token WHERE j.state = 'leased'"
            "  ORDER BY j.id FOR UPDATE OF j),"
        )
        # Each statement returns the tokens of the leases it settled.
        acked = (
            f" counted AS (UPDATE {counters} SET done = done + (SELECT count(*) FROM gone)"
            "  WHERE shard = %(shard)s AND EXISTS (SELECT 1 FROM gone)),"
            f" logged AS ({log} SELECT id, 'ack', extract(epoch from now()), %(pid)s, NULL"
            "  FROM gone)"
            " SELECT token FROM gone"
        )
        self.ack = (
            f"WITH {mine} gone AS (DELETE FROM {jobs} j USING mine WHERE j.id = mine.id"
            "  RETURNING j.id, mine.token)," + acked
        )
        self.ack_keep = (
            f"WITH {mine} gone AS (UPDATE {jobs} j SET state = 'done', done_at = now(),"
            f"  {_NO_LEASE} FROM mine WHERE j.id = mine.id RETURNING j.id, mine.token)," + acked
        )
        self.release = (
            f"WITH {mine} back AS (UPDATE {jobs} j SET state = 'queued', {_NO_LEASE}"
            "  FROM mine WHERE j.id = mine.id RETURNING j.id, mine.token),"
            f" logged AS ({log} SELECT id, 'release', extract(epoch from now()), %(pid)s,"
            "  NULL FROM back)"
            f" SELECT token, pg_notify('{self.channel}', '') FROM back"
        )
        self.release_tokens = (
            f"WITH back AS (UPDATE {jobs} SET state = 'queued', {_NO_LEASE}"
            "  WHERE state = 'leased' AND lease_token = ANY(%(tokens)s::uuid[]) RETURNING id),"
            f" logged AS ({log} SELECT id, 'release', extract(epoch from now()), %(pid)s,"
            "  %(detail)s::text FROM back)"
            f" SELECT id, pg_notify('{self.channel}', '') FROM back"
        )
        self.renew = (
            f"WITH {mine} renewed AS (UPDATE {jobs} j SET renewed_at = now(),"
            "  lease_expires = now() + make_interval(secs => %(lease)s)"
            "  FROM mine WHERE j.id = mine.id RETURNING mine.token)"
            " SELECT token FROM renewed"
        )
        # Expired leases, and those whose holder's lock is free (its session ended) and
        # that were not renewed for a while. The lock test is skipped just after a server
        # restart, while holders are still taking their locks again.
        self.recover = (
            f"WITH orphans AS (SELECT id, lease_pid, lease_host,"
            "   CASE WHEN lease_expires < now() THEN 'which expired'"
            "        ELSE 'whose holder is gone' END AS why"
            f"  FROM {jobs} WHERE state = 'leased' AND (lease_expires < now() OR ("
            "   renewed_at < now() - make_interval(secs => %(silence)s)"
            "   AND pg_postmaster_start_time() < now() - make_interval(secs => 2 * %(silence)s)"
            "   AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory'"
            "    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            "    AND l.classid = %(ns)s::int::oid AND l.objid = lease_holder::oid"
            "    AND l.objsubid = 2 AND l.granted)))"
            "  FOR UPDATE SKIP LOCKED)"
            f" UPDATE {jobs} j SET state = 'queued', lost_leases = j.lost_leases + 1, {_NO_LEASE}"
            " FROM orphans WHERE j.id = orphans.id"
            " RETURNING j.id, j.lost_leases, orphans.lease_pid, orphans.lease_host, orphans.why"
        )
