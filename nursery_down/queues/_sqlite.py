"""SQLiteQueue: a durable job source in one SQLite file (stdlib sqlite3, WAL, leases)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import trio

from .._exceptions import (
    ConfigurationError,
    NotLeasedError,
    PayloadError,
    QueueCorruptError,
    QueueError,
    QueueLockedError,
    QueueUnwritableError,
    describe_error,
)
from .._validate import is_count, require_seconds
from ._holders import (
    drop_presence,
    hold_presence,
    new_owner,
    owner_namespace,
    pid_namespace,
    present,
    process_alive,
    process_token,
)
from ._source import DeadJob, QueuedJob, QueueStatistics
from ._writer import GroupWriter

T = TypeVar("T")

#: ``PRAGMA application_id`` of a queue file ("ndq1"), so that another program's
#: SQLite database is never mistaken for an empty queue.
APPLICATION_ID = 0x6E647131
#: ``PRAGMA user_version``: the layout of the tables below. Version 1 had no
#: ``lost_leases`` column, version 2 no ``history_by_job`` index; opening such a
#: file adds them.
SCHEMA_VERSION = 3

#: Pruning keeps a job's history rows together: it looks up a job's later rows.
_HISTORY_INDEX = "CREATE INDEX IF NOT EXISTS history_by_job ON history (job_id, seq)"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: history refers to it
    payload     TEXT    NOT NULL,                   -- JSON
    state       TEXT    NOT NULL CHECK (state IN ('queued', 'leased')),
    attempts    INTEGER NOT NULL DEFAULT 0,         -- failed attempts so far
    lost_leases INTEGER NOT NULL DEFAULT 0,         -- times its process died holding it
    enqueued_at REAL    NOT NULL,
    lease_pid   INTEGER,                            -- the process holding the lease
    lease_token TEXT,                               -- that process's start token
    lease_owner TEXT,                               -- the SQLiteQueue object holding it
    leased_at   REAL,
    last_error  TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    payload     TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    enqueued_at REAL    NOT NULL,
    died_at     REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    event  TEXT    NOT NULL,  -- enqueue, claim, ack, release, fail, dead, recover
    time   REAL    NOT NULL,  -- time.time() of the process that wrote it
    pid    INTEGER NOT NULL,  -- the process that wrote it
    detail TEXT               -- fail and dead: the error, recover: whose lease
);
{_HISTORY_INDEX};
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('done', 0);
"""

Synchronous = Literal["FULL", "NORMAL"]

#: The lease owners (SQLiteQueue objects) open in this process. A lease of this
#: process whose owner is not among them belongs to a queue whose close could not
#: write its releases (the file stayed locked): nothing can settle it any more, and
#: nothing would take it back while this process runs, so recovery releases it.
_OPEN_OWNERS: set[str] = set()

#: At most this many ids in one ``IN (...)`` list, within any SQLite's limit on
#: variables a statement.
_IDS_A_STATEMENT = 500


def _in_slices(ids: Sequence[int]) -> Iterator[tuple[Sequence[int], str]]:
    """*ids* a statement's worth at a time, each with its ``?`` marks for ``IN (...)``."""
    for start in range(0, len(ids), _IDS_A_STATEMENT):
        part = ids[start : start + _IDS_A_STATEMENT]
        yield part, ",".join("?" * len(part))


#: The rows of at most this many jobs (three each, mostly) are deleted by one pass
#: of the pruning, so that a pass never holds the write lock long; passes come with
#: each lease recovery.
PRUNE_JOBS = 7_000


class SQLiteQueue:
    """A durable :class:`JobSource` in one SQLite file: jobs survive any crash.

    ::

        queue = SQLiteQueue("jobs.db", max_attempts=5)
        await queue.put({"order": 17})
        sup.add(nd.worker_pool(queue, handle), name="orders")

    **Leases.** A claimed job is leased to the running process (its pid and a token
    of its start time, so a reused pid is not mistaken for it). When the queue is
    opened, and every *recover_interval* seconds while claiming, jobs leased by a
    process that no longer runs go back to the queue. So a SIGKILL at any instant
    loses nothing: delivery is at-least-once, and the only jobs run twice are those
    in flight at the kill. Several processes may share one file; a live process's
    leases are never taken back. Processes in other PID namespaces (containers of
    one host sharing the file) cannot see each other's pids: each holds a lock on a
    file next to the queue's, ``<path>-holders``, for as long as it runs, and its
    leases are taken back once it no longer holds it.

    **Attempts.** ``fail()`` counts an attempt; after *max_attempts* the job moves
    to the ``dead_letters`` table. ``release()`` and the recovery of a dead
    process's lease do not count one.

    **Jobs that kill their process.** A job whose process dies while running it
    every time (a crash in a C extension, running out of memory) would come back
    forever. With *max_lost_leases*, a job taken back from dead processes that many
    times moves to the dead letters instead. It is off by default, because a
    SIGKILL, say at the end of a deploy's grace, also takes back the leases of the
    jobs then running: set it well above the number of kills a job may meet.

    **History.** Every enqueue, claim, ack, release, fail, dead-letter and recovery
    is written, in the same transaction as the change, to the ``history`` table
    (job id, event, ``time.time()``, pid, detail), for audits and chaos checks. It
    is kept bounded: rows older than *keep_history* seconds (default 7 days), and
    the oldest beyond *max_history* rows (default 1,000,000), are deleted with each
    lease recovery or by :meth:`prune_history`; None lifts either bound. A job's
    rows go together, and only once it left the queue (acked, or dead-lettered and
    then purged): the history of a job still queued, leased or dead is complete.

    **Opening.** The file is opened on first use, or explicitly with
    ``await queue.open()`` / ``async with queue``. A file that is not a queue
    database (:class:`QueueCorruptError`), that another process keeps locked
    beyond *busy_timeout* (:class:`QueueLockedError`), or that cannot be written
    (:class:`QueueUnwritableError`) raises at open: never a silent empty queue.

    **Durability.** *synchronous* ``"FULL"`` (default) makes every change durable
    against power loss when its call returns; ``"NORMAL"`` is faster and still
    survives any process crash, but a power loss may undo the last changes.

    **Group commit.** One thread of the queue's own owns the write connection; a
    ``put``, ``claim``, ``ack``, ``release`` or ``fail`` hands it the change without
    a thread hop and waits. Every change waiting when a transaction begins goes
    into it, so twenty acks at once cost one commit, and each call returns only
    once its own transaction is durable at the *synchronous* level: a ``put`` or an
    ``ack`` that returned is on disk. A claim never waits for company. Reads
    (:meth:`statistics`, :meth:`dead_letters`) use a connection of their own and
    never wait behind writes. The trio loop never waits on the disk or a lock.

    **Claiming.** ``claim()`` waits for work without polling the disk in a busy
    loop: a ``put`` through this object wakes it at once, and puts from other
    processes are seen within *poll_interval* seconds. :meth:`claim_many` claims
    several jobs in one transaction; :func:`nursery_down.worker_pool` uses it to
    claim for all of its idle workers at once.

    Payloads are stored as JSON: dicts, lists, strings, numbers, booleans and
    ``None`` (tuples come back as lists). Anything else raises :class:`PayloadError`.
    A job whose stored payload no longer reads as JSON (the file was changed by
    hand) goes to the dead letters, its text kept, when a claim reaches it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_attempts: int = 5,
        max_lost_leases: int | None = None,
        busy_timeout: float = 5.0,
        poll_interval: float = 0.1,
        recover_interval: float = 2.0,
        synchronous: Synchronous = "FULL",
        keep_history: float | None = 7 * 24 * 3600.0,
        max_history: int | None = 1_000_000,
    ) -> None:
        if not is_count(max_attempts):
            raise ConfigurationError(
                f"max_attempts must be a whole number >= 1, got {max_attempts!r}"
            )
        for what, count in (("max_lost_leases", max_lost_leases), ("max_history", max_history)):
            if count is not None and not is_count(count):
                raise ConfigurationError(
                    f"{what} must be a whole number >= 1, or None for no limit, got {count!r}"
                )
        for what, value in (
            ("busy_timeout", busy_timeout),
            ("poll_interval", poll_interval),
            ("recover_interval", recover_interval),
        ):
            require_seconds(what, value)
        if keep_history is not None:
            require_seconds("keep_history", keep_history)
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigurationError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.path = os.fspath(path)
        self.max_attempts = max_attempts
        self.max_lost_leases = max_lost_leases
        self.busy_timeout = float(busy_timeout)
        self.poll_interval = float(poll_interval)
        self.recover_interval = float(recover_interval)
        self.synchronous: Synchronous = synchronous
        self.keep_history = None if keep_history is None else float(keep_history)
        self.max_history = max_history
        self._writer: GroupWriter | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_limiter: trio.CapacityLimiter | None = None
        self._open_lock: trio.Lock | None = None
        self._wakeup: trio.Event | None = None
        self._closed = False
        self._next_recovery = -math.inf
        # Who holds a lease: this process (pid + start token) and this object.
        self._pid = 0
        self._token = ""
        self._owner = new_owner()
        # The job handed out by each lease this object holds, by id: a job is
        # settled through the very QueuedJob its claim returned, so a handle from an
        # earlier claim of the same id (before a close, or before a failed attempt)
        # can never settle the claim that holds the job now.
        self._claims: dict[int, QueuedJob] = {}
        # The ids of jobs leased through this object whose settle could not be written
        # (the file locked, the disk full): the next recovery pass puts back those
        # still leased, and they are forgotten once its transaction committed.
        self._orphans: set[int] = set()

    # -- opening and closing ------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating if needed) the file, check it, and requeue orphaned leases.

        Called by the first operation if not called before. A closed queue opens
        again, as the service that owns it does when it restarts; jobs claimed before
        the close stay released and cannot be settled through it any more. Raises
        :class:`QueueCorruptError`, :class:`QueueLockedError` or
        :class:`QueueUnwritableError` with what to do.
        """
        await self._open(reopen=True)

    async def _open(self, *, reopen: bool) -> None:
        if self._writer is not None:
            # Before the lock, which may belong to another trio run as the writer does.
            self._writer.check_run()
        if self._open_lock is None:
            self._open_lock = trio.Lock()
            self._read_limiter = trio.CapacityLimiter(1)
        async with self._open_lock:
            if self._writer is not None:
                return
            if self._closed:
                if not reopen:
                    # A first use that waited here while the queue was closed: only
                    # an explicit open() opens a closed queue again.
                    raise trio.ClosedResourceError(
                        "this SQLiteQueue was closed; open it again with open() or 'async with'"
                    )
                # A new owner: a lease taken before the close is fenced off for good.
                self._owner = new_owner()
                self._claims.clear()
                self._orphans.clear()  # the close gave back every lease of the old owner
                self._closed = False
            self._pid = os.getpid()
            self._token = process_token(self._pid) or ""
            _OPEN_OWNERS.add(self._owner)  # before any claim can lease to it
            writer = GroupWriter(
                os.path.basename(self.path),
                self._open_sync,
                functools.partial(translate_error, path=self.path, busy_timeout=self.busy_timeout),
                refusals=(NotLeasedError,),
            )
            try:
                await writer.start()
                try:
                    self._reader = await self._in_reader_thread(self._connect)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await writer.stop(self._leave_sync)
                    raise
            except BaseException:
                _OPEN_OWNERS.discard(self._owner)
                raise
            self._writer = writer
            self._next_recovery = trio.current_time() + self.recover_interval

    async def aclose(self) -> None:
        """Close the file. Claims return ``None`` from now on; jobs still leased through
        this object go back to the queue (unstarted, attempt not counted).

        A queue left open by a ``trio.run()`` that has ended is closed by any later
        one; one open in another ``trio.run()`` still running raises
        :class:`QueueError`, and stays open.
        """
        if self._writer is not None:
            self._writer.check_run(closing=True)
        self._closed = True
        self._wake()
        if self._open_lock is None:  # never opened
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):
            # Always through the lock, even when closed already or not open yet: an
            # open in progress (a first use, say) finishes and is closed here rather
            # than after this returned, and a second close returns only once the
            # first one is done. Never half-closed under a reopening, either.
            async with self._open_lock:
                self._closed = True  # again: an open() that came first reopened it
                self._wake()
                writer, reader = self._writer, self._reader
                self._writer = self._reader = None
                self._claims.clear()
                try:
                    if writer is not None:
                        await writer.stop(self._close_sync)
                finally:
                    # Even when the close could not release the leases (the file
                    # stayed locked): the next recovery in this process does.
                    _OPEN_OWNERS.discard(self._owner)
                    if reader is not None:
                        await self._in_reader_thread(reader.close)

    async def __aenter__(self) -> Self:
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

    # -- putting ------------------------------------------------------------------------

    async def put(self, payload: Any) -> int:
        """Store a job durably and return its id. *payload* must be JSON-able."""
        (job_id,) = await self.put_many([payload])
        return job_id

    async def put_many(self, payloads: Iterable[Any]) -> list[int]:
        """Store one job per payload in one transaction (all or none); return their ids."""
        texts = [encode_payload(payload) for payload in payloads]
        ids = await self._write(self._put_sync, texts)
        self._wake()
        return ids

    # -- the JobSource protocol ---------------------------------------------------------

    async def claim(self) -> QueuedJob | None:
        """Wait for a job and lease it to this process; ``None`` once this queue is closed."""
        jobs = await self.claim_many(1)
        return jobs[0] if jobs else None

    async def claim_many(self, limit: int) -> list[QueuedJob]:
        """Wait for work, then lease up to *limit* jobs, oldest first, in one transaction.

        Returns at least one job, or ``[]`` once this queue is closed. Each job is
        settled on its own, as if claimed alone.
        """
        if not is_count(limit):
            raise ConfigurationError(f"limit must be a whole number >= 1, got {limit!r}")
        # SQLite's integers stop at 2**63 - 1: a larger limit would fail in the writer
        # thread (OverflowError), rolling back the claims and puts it came with.
        limit = min(limit, 2**62)
        if not self._closed:
            # Closed while it opened: no jobs, as below.
            with contextlib.suppress(trio.ClosedResourceError):
                await self._ready()
        while True:
            if self._closed:
                await trio.lowlevel.checkpoint()
                return []
            recover = trio.current_time() >= self._next_recovery
            if recover:
                self._next_recovery = trio.current_time() + self.recover_interval
            # Put back by this claim's recovery: forgotten only once it committed.
            orphans = tuple(self._orphans) if recover else ()
            # Taken before looking, so a put that lands after the look still wakes us.
            wakeup = self._wakeup_event()
            # A claim handed to the writer always delivers its result, even when this
            # task is cancelled meanwhile (the cancellation waits for it), and nothing
            # here checkpoints between the claim and the return: a claimed job is
            # never dropped on the floor.
            try:
                jobs = await self._write(
                    self._claim_sync,
                    limit,
                    recover,
                    orphans,
                    peek=None if recover else self._has_queued,
                    idle=[],
                )
            except Exception:
                if recover:  # not written: the next claim recovers again
                    self._next_recovery = -math.inf
                raise
            self._orphans.difference_update(orphans)
            if jobs:
                # Closed while the claim ran: aclose() releases every lease of this
                # object after it, these included, so hand nothing out. (Read
                # through the property: the write above may have seen it change.)
                if self.closed:
                    return []
                claims = self._claims
                for job in jobs:
                    claims[job.id] = job
                return jobs
            with trio.move_on_after(self.poll_interval):
                await wakeup.wait()

    async def ack(self, job: QueuedJob) -> None:
        """The job is done: delete it (counted in ``statistics().done``)."""
        await self._settle(self._ack_sync, job, "ack")

    async def release(self, job: QueuedJob) -> None:
        """Put the job back, unstarted; its attempt is not counted."""
        await self._settle(self._release_sync, job, "release")
        self._wake()

    async def fail(self, job: QueuedJob, error: BaseException | str) -> None:
        """Count a failed attempt: requeue the job, or dead-letter it after ``max_attempts``."""
        # An error's message may hold lone surrogates (a file name that is not UTF-8):
        # stored as it is, it would fail the write and leave the job leased. And an
        # exception whose message cannot be read must not leave it leased either.
        try:
            described = describe_error(error)
        except Exception as exc:
            described = f"{type(error).__name__} (its message could not be read: {exc!r})"
        error_text = storable_text(described)
        await self._settle(self._fail_sync, job, "fail", error_text)
        self._wake()

    # -- reading ------------------------------------------------------------------------

    async def statistics(self) -> QueueStatistics:
        """Counts read from the file (other processes' jobs included).

        Async, unlike ``MemoryQueue.statistics()``, because it reads the shared file.
        """
        return await self._read(_statistics)

    async def dead_letters(self) -> list[DeadJob]:
        """The jobs that failed ``max_attempts`` times, oldest first."""
        return await self._read(_dead_letters)

    async def requeue_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Put dead letters *ids* (all when None) back in the queue with their attempts
        reset; return how many. Unknown ids are ignored."""
        chosen = None if ids is None else [int(i) for i in ids]
        count = await self._write(self._requeue_dead_sync, chosen)
        if count:
            self._wake()
        return count

    async def purge_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Delete dead letters *ids* (all when None) for good; return how many."""
        chosen = None if ids is None else [int(i) for i in ids]
        return await self._write(_purge_dead, chosen)

    async def recover(self) -> int:
        """Take back the jobs leased by processes that no longer run, now; return how many.

        They are requeued, or dead-lettered once they reach *max_lost_leases*. Jobs
        leased through a queue of this process whose close could not release them
        (the file stayed locked) are released too, and so are jobs of this queue
        whose last ack, release or fail could not be written.

        Opening the queue and claiming do this by themselves.
        """
        orphans = tuple(self._orphans)
        recovered = await self._write(self._recover_on, orphans)
        self._orphans.difference_update(orphans)
        return recovered

    async def prune_history(self) -> int:
        """Delete what the history keeps beyond *keep_history* and *max_history* now
        (the rows of at most a few thousand jobs a call); return how many rows went.

        Claiming does this by itself with each lease recovery.
        """
        return await self._write(self._prune_on)

    # -- internals: on the trio thread ----------------------------------------------------

    async def _ready(self) -> GroupWriter:
        if self._writer is None:
            if self._closed:
                # Only an explicit open() (or ``async with``) opens a closed queue again.
                raise trio.ClosedResourceError(
                    "this SQLiteQueue was closed; open it again with open() or 'async with'"
                )
            await self._open(reopen=False)
        writer = self._writer
        if writer is None:  # closed while it opened
            raise trio.ClosedResourceError("this SQLiteQueue was closed")
        return writer

    async def _write(
        self,
        function: Callable[..., T],
        *args: Any,
        peek: Callable[[sqlite3.Connection], bool] | None = None,
        idle: Any = None,
    ) -> T:
        writer = await self._ready()
        return await writer.run(function, *args, peek=peek, idle=idle)

    async def _read(self, function: Callable[[sqlite3.Connection], T]) -> T:
        # Checked here as a write checks it in GroupWriter.run: the reader's limiter
        # belongs to the trio run that opened the queue too.
        (await self._ready()).check_run()
        reader = self._reader
        if reader is None:
            raise trio.ClosedResourceError("this SQLiteQueue was closed")
        return await self._in_reader_thread(functools.partial(function, reader))

    async def _in_reader_thread(self, function: Callable[[], T]) -> T:
        def translated() -> T:
            try:
                return function()
            except sqlite3.Error as exc:
                raise translate_error(exc, self.path, self.busy_timeout) from exc

        return await trio.to_thread.run_sync(translated, limiter=self._read_limiter)

    async def _settle(
        self, function: Callable[..., None], job: QueuedJob, action: str, *args: Any
    ) -> None:
        # Settling is never cut half-way: a job acked, released or failed stays so.
        with trio.CancelScope(shield=True):
            if self._writer is None and self._closed:
                raise trio.ClosedResourceError("this SQLiteQueue was closed")
            if self._claims.get(job.id) is not job:
                await trio.lowlevel.checkpoint()
                raise _not_leased(job.id, action)
            try:
                await self._write(function, job.id, *args)
            except NotLeasedError:
                self._spend(job)
                raise
            except Exception:
                # Not written (the file locked, the disk full). A caller that moved on
                # (a worker pool crashed on the error) never settles it, and the lease
                # of a live process is never taken back: the next claim puts the job
                # back. Its handle settles nothing more, so that no retry of it can
                # race that claim and settle the job's next lease.
                self._spend(job)
                self._orphans.add(job.id)
                self._next_recovery = -math.inf
                raise
            self._spend(job)

    def _spend(self, job: QueuedJob) -> None:
        """*job*'s handle is settled (or was refused): it settles nothing more. A
        concurrent settle of the same handle may have spent it already."""
        if self._claims.get(job.id) is job:
            del self._claims[job.id]

    def _wakeup_event(self) -> trio.Event:
        if self._wakeup is None:
            self._wakeup = trio.Event()
        return self._wakeup

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    # -- internals: in the writer thread ------------------------------------------------
    # Each runs inside a transaction the writer opened, and refuses (NotLeasedError)
    # before it writes anything, so that the rest of its group still commits.

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise QueueUnwritableError(
                f"cannot create queue file {path!r}: the folder {folder!r} does not exist; "
                "create it first, or give a path in an existing folder"
            )
        if os.path.isdir(path):
            raise QueueUnwritableError(
                f"queue path {path!r} is a folder; give the path of a file, e.g. {path}/jobs.db"
            )
        return sqlite3.connect(
            path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )

    def _open_sync(self) -> sqlite3.Connection:
        connection = self._connect()
        try:
            self._prepare(connection)
            # Before any lease, once the file is known to be a queue's: processes of
            # other PID namespaces see this one run.
            hold_presence(self.path, self._token)
        except BaseException:
            connection.close()
            raise
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        # Reading the header first: a file that is not SQLite fails here, before
        # anything is written to it.
        connection.execute("PRAGMA application_id").fetchone()
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise QueueUnwritableError(
                f"queue file {self.path!r} cannot use write-ahead logging (journal mode "
                f"stays {mode!r}); put it on a local disk that allows it"
            )
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        with _WriteTransaction(connection):
            application_id = connection.execute("PRAGMA application_id").fetchone()[0]
            if application_id == 0:
                tables = connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
                if tables:
                    raise QueueCorruptError(
                        f"{self.path!r} is an SQLite database of another program, not a job "
                        "queue; nothing was changed: give the queue a path of its own"
                    )
                # One statement at a time: executescript() would commit our transaction.
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA application_id={APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif application_id != APPLICATION_ID:
                raise QueueCorruptError(
                    f"{self.path!r} is an SQLite database of another program (application id "
                    f"{application_id:#x}), not a job queue; give the queue a path of its own"
                )
            else:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version in (1, 2):  # older layouts, upgraded in place
                    if version == 1:
                        connection.execute(
                            "ALTER TABLE jobs ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0"
                        )
                    connection.execute(_HISTORY_INDEX)
                    connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise QueueCorruptError(
                        f"queue file {self.path!r} has layout version {version}, this "
                        f"nursery_down reads version {SCHEMA_VERSION}; upgrade nursery_down"
                    )
        with _WriteTransaction(connection):
            self._recover_on(connection)

    def _leave_sync(self, connection: sqlite3.Connection) -> None:
        """The writer's last act when nothing is to be released."""
        drop_presence(self.path, self._token)

    def _close_sync(self, connection: sqlite3.Connection) -> None:
        try:
            self._release_all_sync(connection)
        finally:
            # Even when the releases could not be written: the leases left are
            # fenced off, and this process's own recovery takes them back.
            drop_presence(self.path, self._token)

    def _release_all_sync(self, connection: sqlite3.Connection) -> None:
        with _WriteTransaction(connection):
            self._requeue_leased(
                connection, "lease_owner = ?", (self._owner,), "release", "queue closed"
            )

    def _has_queued(self, connection: sqlite3.Connection) -> bool:
        """A look without the write lock (outside any transaction): is a job queued?"""
        row = connection.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone()
        return row is not None

    def _put_sync(self, connection: sqlite3.Connection, texts: list[str]) -> list[int]:
        now = time.time()
        ids = []
        for text in texts:
            cursor = connection.execute(
                "INSERT INTO jobs (payload, state, enqueued_at) VALUES (?, 'queued', ?)",
                (text, now),
            )
            assert cursor.lastrowid is not None
            ids.append(cursor.lastrowid)
        self._log(connection, ids, "enqueue", None, now)
        return ids

    def _claim_sync(
        self, connection: sqlite3.Connection, limit: int, recover: bool, orphans: tuple[int, ...]
    ) -> list[QueuedJob]:
        if recover:
            self._recover_on(connection, orphans)
            self._prune_on(connection)
        while True:
            rows = connection.execute(
                "SELECT id, payload, attempts, enqueued_at FROM jobs WHERE state = 'queued'"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            if not rows:
                return []
            now = time.time()
            jobs = []
            for job_id, text, attempts, enqueued_at in rows:
                try:
                    payload = json.loads(text)
                except (TypeError, ValueError, RecursionError) as exc:
                    # Changed outside nursery_down: it would fail every claim that
                    # reaches it, and hold up every job behind it. It goes to the dead
                    # letters, its text kept, and the claim goes on with the others.
                    error = _undecodable(exc)
                    self._dead_letter(connection, job_id, text, attempts, error, enqueued_at, now)
                    continue
                jobs.append(QueuedJob(job_id, payload, attempts))
            if jobs:
                break
        ids = [job.id for job in jobs]
        # The rows read are every queued job up to the last id read (the oldest
        # first, in this same transaction): one bound names them all, where a list
        # of their ids would pass SQLite's limit on variables a statement (32,766,
        # or 999 on older builds) for a large limit.
        connection.execute(
            "UPDATE jobs SET state = 'leased', lease_pid = ?, lease_token = ?,"
            " lease_owner = ?, leased_at = ? WHERE state = 'queued' AND id <= ?",
            (self._pid, self._token, self._owner, now, ids[-1]),
        )
        self._log(connection, ids, "claim", None, now)
        return jobs

    def _ack_sync(self, connection: sqlite3.Connection, job_id: int) -> None:
        cursor = connection.execute(
            "DELETE FROM jobs WHERE id = ? AND state = 'leased' AND lease_owner = ?",
            (job_id, self._owner),
        )
        _require_lease(cursor, job_id, "ack")
        connection.execute("UPDATE counters SET value = value + 1 WHERE name = 'done'")
        self._log(connection, [job_id], "ack")

    def _release_sync(self, connection: sqlite3.Connection, job_id: int) -> None:
        cursor = connection.execute(
            "UPDATE jobs SET state = 'queued', lease_pid = NULL, lease_token = NULL,"
            " lease_owner = NULL, leased_at = NULL"
            " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
            (job_id, self._owner),
        )
        _require_lease(cursor, job_id, "release")
        self._log(connection, [job_id], "release")

    def _fail_sync(self, connection: sqlite3.Connection, job_id: int, error: str) -> None:
        now = time.time()
        row = connection.execute(
            "SELECT payload, attempts, enqueued_at FROM jobs"
            " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
            (job_id, self._owner),
        ).fetchone()
        if row is None:
            raise _not_leased(job_id, "fail")
        text, attempts, enqueued_at = row
        attempts += 1
        self._log(connection, [job_id], "fail", error, now)
        if attempts >= self.max_attempts:
            self._dead_letter(connection, job_id, text, attempts, error, enqueued_at, now)
        else:
            connection.execute(
                "UPDATE jobs SET state = 'queued', attempts = ?, last_error = ?,"
                " lease_pid = NULL, lease_token = NULL, lease_owner = NULL, leased_at = NULL"
                " WHERE id = ?",
                (attempts, error, job_id),
            )

    def _requeue_dead_sync(self, connection: sqlite3.Connection, ids: list[int] | None) -> int:
        rows = _chosen_dead(connection, ids)
        for job_id, text, enqueued_at in rows:
            connection.execute("DELETE FROM dead_letters WHERE id = ?", (job_id,))
            connection.execute(
                "INSERT INTO jobs (id, payload, state, attempts, enqueued_at)"
                " VALUES (?, ?, 'queued', 0, ?)",
                (job_id, text, enqueued_at),
            )
        self._log(connection, [row[0] for row in rows], "enqueue", "requeued from the dead letters")
        return len(rows)

    def _recover_on(self, connection: sqlite3.Connection, orphans: tuple[int, ...] = ()) -> int:
        # A lease's holder is a process run (pid and token) and one queue object of it
        # (owner), whose name ends with the process's PID namespace.
        holders = connection.execute(
            "SELECT DISTINCT lease_pid, lease_token, lease_owner FROM jobs WHERE state = 'leased'"
        ).fetchall()
        here = pid_namespace()
        closed: list[str] = []
        gone: dict[tuple[int, str], list[str]] = {}
        for pid, token, owner in holders:
            namespace = owner_namespace(owner)
            if namespace is not None and namespace != here:
                # Another PID namespace (another container sharing the file): its pid
                # names nothing here, or another process, and a pid check would take
                # back its live leases again and again. Its presence lock tells.
                if present(self.path, token, namespace):
                    continue
            elif (pid, token) == (self._pid, self._token):
                if owner not in _OPEN_OWNERS:
                    closed.append(owner)
                continue
            elif process_alive(pid, token):
                continue
            gone.setdefault((pid, token), []).append(owner)
        holder = "lease_pid IS ? AND lease_token IS ? AND lease_owner IS ?"
        recovered = 0
        for part, marks in _in_slices(orphans):  # jobs whose settle could not be written
            recovered += len(
                self._requeue_leased(
                    connection,
                    f"lease_owner IS ? AND id IN ({marks})",
                    (self._owner, *part),
                    "release",
                    "its settle could not be written",
                )
            )
        for owner in closed:  # queues of this process closed without releasing them
            recovered += len(
                self._requeue_leased(
                    connection, holder, (self._pid, self._token, owner), "release", "queue closed"
                )
            )
        for (pid, token), owners in gone.items():
            now = time.time()
            detail = f"lease of pid {pid}, which no longer runs"
            ids: list[int] = []
            for owner in owners:
                ids += self._requeue_leased(
                    connection, holder, (pid, token, owner), "recover", detail, now, lost=True
                )
            if ids and self.max_lost_leases is not None:
                self._bury_job_killers(connection, ids, pid, now)
            recovered += len(ids)
        return recovered

    def _requeue_leased(
        self,
        connection: sqlite3.Connection,
        holder: str,
        params: tuple[Any, ...],
        event: str,
        detail: str,
        now: float | None = None,
        *,
        lost: bool = False,
    ) -> list[int]:
        """Put the jobs leased to *holder* (an SQL condition) back in the queue, with
        an *event* history row each; *lost* counts a lost lease. Their ids."""
        ids = [
            row[0]
            for row in connection.execute(
                f"SELECT id FROM jobs WHERE state = 'leased' AND {holder}", params
            )
        ]
        if ids:
            counted = " lost_leases = lost_leases + 1," if lost else ""
            connection.execute(
                f"UPDATE jobs SET state = 'queued',{counted} lease_pid = NULL,"
                " lease_token = NULL, lease_owner = NULL, leased_at = NULL"
                f" WHERE state = 'leased' AND {holder}",
                params,
            )
            self._log(connection, ids, event, detail, now)
        return ids

    def _prune_on(self, connection: sqlite3.Connection) -> int:
        """Delete the history rows beyond the bounds of up to PRUNE_JOBS jobs, oldest
        first, whole jobs only, and only of jobs that left the queue."""
        first, last = connection.execute("SELECT min(seq), max(seq) FROM history").fetchone()
        if first is None:
            return 0
        end = first  # rows before this seq may go
        if self.max_history is not None:
            end = max(end, last - self.max_history + 1)
        if self.keep_history is not None:
            end = max(
                end, _first_seq_since(connection, first, last, time.time() - self.keep_history)
            )
        if end <= first:
            return 0
        # The pass is bounded in jobs, chosen by their first row, and deletes every
        # row of each: bounded in rows (ORDER BY seq LIMIT n), it would cut the jobs
        # whose rows straddle the n-th, leaving a reader acks of jobs never enqueued.
        # A job goes only if all of its rows are before the end.
        cursor = connection.execute(
            "DELETE FROM history WHERE job_id IN ("
            " SELECT job_id FROM history AS old WHERE seq < :end"
            " AND NOT EXISTS (SELECT 1 FROM history AS earlier"
            "  WHERE earlier.job_id = old.job_id AND earlier.seq < old.seq)"
            " AND job_id NOT IN (SELECT id FROM jobs)"
            " AND job_id NOT IN (SELECT id FROM dead_letters)"
            " AND NOT EXISTS (SELECT 1 FROM history AS later"
            "  WHERE later.job_id = old.job_id AND later.seq >= :end)"
            " ORDER BY seq LIMIT :jobs)",
            {"end": end, "jobs": PRUNE_JOBS},
        )
        return cursor.rowcount

    def _bury_job_killers(
        self, connection: sqlite3.Connection, ids: list[int], pid: int, now: float
    ) -> None:
        """Dead-letter the jobs among *ids* whose processes died max_lost_leases times."""
        killers: list[Any] = []
        # A slice at a time: a process may have died holding more leases than SQLite
        # takes variables in a statement (999 on older builds), and a recovery that
        # failed on that would fail every open of the file.
        for part, marks in _in_slices(ids):
            killers += connection.execute(
                f"SELECT id, payload, attempts, lost_leases, enqueued_at FROM jobs"
                f" WHERE id IN ({marks}) AND lost_leases >= ?",
                (*part, self.max_lost_leases),
            ).fetchall()
        for job_id, text, attempts, lost, enqueued_at in killers:
            error = f"its process died while running it, {lost} times (the last was pid {pid})"
            self._dead_letter(connection, job_id, text, attempts, error, enqueued_at, now)

    def _dead_letter(
        self,
        connection: sqlite3.Connection,
        job_id: int,
        payload: str,
        attempts: int,
        error: str,
        enqueued_at: float,
        now: float,
    ) -> None:
        """Move a job to the dead letters, in the caller's transaction."""
        connection.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        connection.execute(
            "INSERT INTO dead_letters (id, payload, attempts, error, enqueued_at, died_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, payload, attempts, error, enqueued_at, now),
        )
        self._log(connection, [job_id], "dead", error, now)

    def _log(
        self,
        connection: sqlite3.Connection,
        ids: list[int],
        event: str,
        detail: str | None = None,
        now: float | None = None,
    ) -> None:
        stamp = time.time() if now is None else now
        connection.executemany(
            "INSERT INTO history (job_id, event, time, pid, detail) VALUES (?, ?, ?, ?, ?)",
            [(job_id, event, stamp, self._pid, detail) for job_id in ids],
        )


# -- what the connections do, outside the queue object ----------------------------------------


def _statistics(connection: sqlite3.Connection) -> QueueStatistics:
    # One read transaction, so the four numbers belong to the same instant.
    with _ReadTransaction(connection):
        counts = dict(connection.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
        done = connection.execute("SELECT value FROM counters WHERE name = 'done'").fetchone()
        dead = connection.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    return QueueStatistics(
        queued=counts.get("queued", 0),
        leased=counts.get("leased", 0),
        done=done[0] if done else 0,
        dead=dead,
    )


def _dead_letters(connection: sqlite3.Connection) -> list[DeadJob]:
    rows = connection.execute(
        "SELECT id, payload, attempts, error, died_at FROM dead_letters ORDER BY died_at, id"
    ).fetchall()
    return [
        DeadJob(job_id, _decoded_or_stored(text), attempts, error, died_at)
        for job_id, text, attempts, error, died_at in rows
    ]


def _decoded_or_stored(text: Any) -> Any:
    """A dead letter's payload: decoded, or as stored when it is not valid JSON (it was
    changed outside nursery_down, and dead-lettered for that)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return text


def _undecodable(exc: BaseException) -> str:
    reason = "nested too deeply to decode" if isinstance(exc, RecursionError) else str(exc)
    return (
        f"its payload is not valid JSON ({reason}), so it cannot be handed out; it was "
        "changed outside nursery_down: correct it in the dead_letters table and requeue "
        "it, or purge it"
    )


def _chosen_dead(connection: sqlite3.Connection, ids: list[int] | None) -> list[Any]:
    rows = connection.execute(
        "SELECT id, payload, enqueued_at FROM dead_letters ORDER BY died_at, id"
    ).fetchall()
    wanted = None if ids is None else set(ids)
    return [row for row in rows if wanted is None or row[0] in wanted]


def _purge_dead(connection: sqlite3.Connection, ids: list[int] | None) -> int:
    rows = _chosen_dead(connection, ids)
    connection.executemany("DELETE FROM dead_letters WHERE id = ?", [(row[0],) for row in rows])
    return len(rows)


def _first_seq_since(connection: sqlite3.Connection, first: int, last: int, moment: float) -> int:
    """The first history seq written at or after *moment* (last + 1 if none).

    A binary search on seq, as rows are written in time order (the time column has
    no index: a search costs about twenty lookups by seq).
    """
    low, high = first, last + 1
    while low < high:
        middle = (low + high) // 2
        row = connection.execute(
            "SELECT seq, time FROM history WHERE seq >= ? ORDER BY seq LIMIT 1", (middle,)
        ).fetchone()
        if row is None or row[1] >= moment:
            high = middle
        else:
            low = row[0] + 1
    return low


def _require_lease(cursor: sqlite3.Cursor, job_id: int, action: str) -> None:
    if cursor.rowcount != 1:
        raise _not_leased(job_id, action)


def _not_leased(job_id: int, action: str) -> NotLeasedError:
    return NotLeasedError(
        f"cannot {action} job {job_id}: this queue does not hold it as claimed "
        "(was it settled already, or claimed through another SQLiteQueue object?)"
    )


class _WriteTransaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error.

    IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
    transaction never fails half-way because another process wrote meanwhile.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self._connection.execute("COMMIT")
        elif self._connection.in_transaction:
            self._connection.execute("ROLLBACK")


class _ReadTransaction(_WriteTransaction):
    def __enter__(self) -> None:
        self._connection.execute("BEGIN")


def encode_payload(payload: Any) -> str:
    """The JSON text stored for *payload*, or :class:`PayloadError` saying why not."""
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"cannot store a payload of type {type(payload).__name__}: {exc}; an SQLiteQueue "
            "stores JSON (dict, list, str, int, float, bool, None), so convert it first, "
            "e.g. dataclasses.asdict(obj) or str(value)"
        ) from None
    except RecursionError:
        # A refusal like the others, not a RecursionError no caller would expect.
        raise PayloadError(
            f"cannot store a payload of type {type(payload).__name__}: it is nested too "
            "deeply to encode as JSON; flatten it first"
        ) from None
    if not text.isascii() and not _utf8(text):
        # A lone surrogate (a file name that is not UTF-8, as os.listdir() gives it)
        # has no UTF-8 form, and SQLite stores UTF-8: the write would fail in the
        # writer thread. Escaped as JSON \u sequences, it reads back the same.
        text = json.dumps(payload, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
    return text


def storable_text(text: str) -> str:
    """*text*, with any lone surrogate written as a backslash escape (SQLite stores
    UTF-8, which has no form for one)."""
    if text.isascii() or _utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def translate_error(exc: sqlite3.Error, path: str, busy_timeout: float) -> QueueError:
    """The :class:`QueueError` a user should see for an sqlite3 error on *path*."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return QueueLockedError(
            f"queue file {path!r} stayed locked by another process for {busy_timeout:g} s "
            f"({exc}); find it with `fuser {path}` and end its transaction, or pass a "
            "longer busy_timeout="
        )
    if name.startswith("SQLITE_TOOBIG"):
        return PayloadError(
            f"cannot store a value this large in queue file {path!r} ({exc}): SQLite "
            "limits a payload's JSON (or an error message) to 1 GB by default; keep large "
            "data elsewhere and put a reference to it in the job"
        )
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return QueueCorruptError(
            f"queue file {path!r} is not a queue database or is damaged ({exc}); "
            "move it aside (keep it for recovery) and restore a backup, or use another path"
        )
    if name.startswith(
        (
            "SQLITE_READONLY",
            "SQLITE_CANTOPEN",
            "SQLITE_PERM",
            "SQLITE_AUTH",
            "SQLITE_FULL",
            "SQLITE_IOERR",
        )
    ):
        return QueueUnwritableError(
            f"cannot write queue file {path!r} ({exc}); check that the folder exists, that "
            "this user may write the file and the folder (SQLite adds -wal and -shm files "
            "next to it, and the queue a -holders file), and that the disk has space"
        )
    return QueueError(f"queue file {path!r}: {exc}")
