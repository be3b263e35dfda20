"""What happened to every job, recorded where a killed process cannot erase it, and checked.

A history is a list of job events (enqueue, claim, start, complete, ack, release,
fail, dead, recover), the signals a harness sent and the exits it saw. It is read
from two places, merged by time:

- a JSON-lines file that the harness owns and the target appends to, one
  ``os.write`` per event (:class:`HistoryRecorder`, :class:`RecordingSource`): once
  the call returns the line is in the kernel, so a SIGKILL right after cannot undo it;
- the ``history`` table of an :class:`~nursery_down.queues.SQLiteQueue` file, which
  the queue writes in the same transaction as each change, plus its ``jobs`` table:
  jobs still waiting there at the end are *pending*, not lost.

:func:`check_history` then says which jobs
were lost, run more than once, never enqueued, or started after a drain signal, and
how long each process took to exit after its signal.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

from .._closing import ClosesOnExit
from ..queues._source import JobSource, QueuedJob

#: A job's id: what its source calls it (an ``int`` for the bundled queues).
JobId: TypeAlias = int | str

#: The job events a history holds, in the order a job meets them.
JOB_EVENTS: Final = (
    "enqueue",  # put into the source
    "claim",  # handed out by the source (leased)
    "start",  # the handler began (only recorded by RecordingSource.wrap)
    "complete",  # the handler returned (only recorded by RecordingSource.wrap)
    "ack",  # settled as done
    "release",  # put back unstarted, or hard-cancelled at the grace deadline
    "fail",  # the attempt raised; retried later or dead-lettered
    "dead",  # moved to the dead-letter list
    "recover",  # the lease of a process that died went back to the queue
)

#: Signals that begin a drain: no job should start after one.
DRAIN_SIGNALS: Final = frozenset({"SIGTERM", "SIGINT"})

#: The environment variable a harness sets to the history file its target appends to.
HISTORY_ENV: Final = "NURSERY_DOWN_HISTORY"


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One thing that happened to one job."""

    job: JobId
    #: One of :data:`JOB_EVENTS`.
    event: str
    #: ``time.time()`` of the process that recorded it.
    time: float
    #: The process that recorded it.
    pid: int
    #: fail and dead: the error; recover: whose lease; else None.
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class SignalSent:
    """A signal the harness sent to a process."""

    pid: int
    #: ``"SIGTERM"``, ``"SIGKILL"``, ...
    signal: str
    time: float


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """A process the harness saw exit."""

    pid: int
    #: As :attr:`subprocess.Popen.returncode`: negative for a death by signal.
    returncode: int
    time: float


@dataclass(frozen=True)
class History:
    """Everything recorded about one chaos scenario (see :func:`read_history`)."""

    events: tuple[JobEvent, ...] = ()
    signals: tuple[SignalSent, ...] = ()
    exits: tuple[ProcessExit, ...] = ()
    #: Jobs still waiting in a durable queue at the end (queued, or leased by a dead process).
    pending: frozenset[JobId] = frozenset()

    def in_flight(self, pid: int | None = None) -> dict[JobId, float]:
        """Jobs taken and not yet settled, by *pid* (any process if None): id -> since when.

        A job is in flight from its claim (or its start, if no claim was recorded)
        until its ack, release or fail, or until the recovery of its lease.
        """
        running: dict[JobId, tuple[int, float]] = {}
        for event in self.events:
            if event.event in ("claim", "start"):
                if event.event == "start" and event.job in running:
                    continue  # the claim already counts it
                running[event.job] = (event.pid, event.time)
            elif event.event in ("ack", "release", "fail", "recover"):
                running.pop(event.job, None)
        return {
            job: since for job, (holder, since) in running.items() if pid is None or holder == pid
        }


# -- recording ----------------------------------------------------------------------------


class HistoryRecorder(ClosesOnExit):
    """Appends events to a JSON-lines history file, one ``os.write`` each.

    Each call returns once its line is in the kernel: a SIGKILL of the recording
    process right after cannot erase it. The file is opened in append mode, so the
    harness and the target may both write to it::

        recorder = HistoryRecorder(os.environ["NURSERY_DOWN_HISTORY"])
        recorder.record(17, "enqueue")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pid = os.getpid()

    def record(self, job: JobId, event: str, detail: str | None = None) -> None:
        """Append one job event, stamped with ``time.time()`` and this process's id."""
        if event not in JOB_EVENTS:
            raise ValueError(f"unknown job event {event!r}; use one of {', '.join(JOB_EVENTS)}")
        self._write(
            {"job": job, "event": event, "time": time.time(), "pid": self._pid, "detail": detail}
        )

    def record_signal(self, pid: int, signal: str, when: float | None = None) -> SignalSent:
        """Append that *signal* was sent to *pid* (now, unless *when* is given)."""
        sent = SignalSent(pid, signal, time.time() if when is None else when)
        self._write({"signal": sent.signal, "pid": sent.pid, "time": sent.time})
        return sent

    def record_exit(self, pid: int, returncode: int, when: float | None = None) -> ProcessExit:
        """Append that *pid* exited with *returncode* (now, unless *when* is given)."""
        gone = ProcessExit(pid, returncode, time.time() if when is None else when)
        self._write({"exit": gone.returncode, "pid": gone.pid, "time": gone.time})
        return gone

    def close(self) -> None:
        """Close the file; later records raise ``ValueError``."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"this HistoryRecorder of {self.path} was closed")
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        # One write of a whole line: appends from several processes never interleave
        # within a line, and a kill leaves either the whole line or none of it.
        written = os.write(self._fd, data)
        while written < len(data):  # only on a full disk or a signal mid-write
            written += os.write(self._fd, data[written:])


Handler: TypeAlias = Callable[[QueuedJob], Awaitable[None]]


class RecordingSource:
    """A :class:`~nursery_down.queues.JobSource` that records what happens to each job.

    Wrap any source; put jobs through the wrapper (so their enqueue is recorded) and
    hand the wrapper to the worker pool. Wrap the handler too, to record when each
    job starts and completes::

        queue = RecordingSource(MemoryQueue(), os.environ["NURSERY_DOWN_HISTORY"])
        queue.put_nowait({"order": 17})
        sup.add(nd.worker_pool(queue, queue.wrap(handle)), name="orders")

    *history* is a path (opened with :class:`HistoryRecorder`) or a recorder.
    A fail that reaches the source's ``max_attempts`` is also recorded as dead.
    """

    def __init__(self, source: JobSource, history: str | os.PathLike[str] | HistoryRecorder):
        self.source = source
        self.recorder = (
            history if isinstance(history, HistoryRecorder) else HistoryRecorder(history)
        )

    async def put(self, payload: Any) -> int:
        """Put a job through the wrapped source's ``put`` and record its enqueue."""
        job_id: int = await self.source.put(payload)  # type: ignore[attr-defined]
        self.recorder.record(job_id, "enqueue")
        return job_id

    def put_nowait(self, payload: Any) -> int:
        """Put a job through the wrapped source's ``put_nowait`` and record its enqueue."""
        job_id: int = self.source.put_nowait(payload)  # type: ignore[attr-defined]
        self.recorder.record(job_id, "enqueue")
        return job_id

    async def claim(self) -> QueuedJob | None:
        job = await self.source.claim()
        if job is not None:
            self.recorder.record(job.id, "claim")
        return job

    async def ack(self, job: QueuedJob) -> None:
        await self.source.ack(job)
        self.recorder.record(job.id, "ack")

    async def release(self, job: QueuedJob) -> None:
        await self.source.release(job)
        self.recorder.record(job.id, "release")

    async def fail(self, job: QueuedJob, error: BaseException | str) -> None:
        await self.source.fail(job, error)
        detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        self.recorder.record(job.id, "fail", detail)
        max_attempts = getattr(self.source, "max_attempts", None)
        if isinstance(max_attempts, int) and job.attempts + 1 >= max_attempts:
            self.recorder.record(job.id, "dead", detail)

    def wrap(self, handler: Handler) -> Handler:
        """*handler*, recording ``start`` before it runs and ``complete`` when it returns."""
        recorder = self.recorder

        async def recorded(job: QueuedJob) -> None:
            recorder.record(job.id, "start")
            await handler(job)
            recorder.record(job.id, "complete")

        recorded.__name__ = getattr(handler, "__name__", "handler")
        recorded.__qualname__ = getattr(handler, "__qualname__", recorded.__name__)
        return recorded


# -- reading ------------------------------------------------------------------------------


def read_history(
    jsonl: str | os.PathLike[str] | None = None,
    sqlite: str | os.PathLike[str] | None = None,
    *,
    pending: Iterable[JobId] = (),
) -> History:
    """Read and merge a JSON-lines history file and an SQLiteQueue file; missing files are empty.

    From the queue file come its ``history`` table and, as *pending*, the jobs still
    in its ``jobs`` table. Pass *pending* yourself for jobs you know wait in another
    durable store.
    """
    events: list[JobEvent] = []
    signals: list[SignalSent] = []
    exits: list[ProcessExit] = []
    waiting = set(pending)
    if jsonl is not None and os.path.exists(jsonl):
        _read_jsonl(Path(jsonl), events, signals, exits)
    if sqlite is not None and os.path.exists(sqlite):
        waiting |= _read_sqlite(os.fspath(sqlite), events)
    # Stable: events of one job recorded in the same instant keep their written order.
    events.sort(key=lambda event: event.time)
    signals.sort(key=lambda sent: sent.time)
    exits.sort(key=lambda gone: gone.time)
    return History(tuple(events), tuple(signals), tuple(exits), frozenset(waiting))


def _read_jsonl(
    path: Path, events: list[JobEvent], signals: list[SignalSent], exits: list[ProcessExit]
) -> None:
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "event" in record:
                events.append(
                    JobEvent(
                        record["job"],
                        str(record["event"]),
                        float(record["time"]),
                        int(record["pid"]),
                        record.get("detail"),
                    )
                )
            elif "signal" in record:
                signals.append(
                    SignalSent(int(record["pid"]), str(record["signal"]), float(record["time"]))
                )
            elif "exit" in record:
                exits.append(
                    ProcessExit(int(record["pid"]), int(record["exit"]), float(record["time"]))
                )
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # a last line cut short: the writer died mid-write
                break
            raise ValueError(
                f"{path}:{number}: not a history record ({exc}): {line[:200]!r}"
            ) from None


def _read_sqlite(path: str, events: list[JobEvent]) -> set[JobId]:
    # Read-only, so reading never creates, changes or locks out the queue.
    connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        connection.execute("BEGIN")  # one snapshot for both tables
        rows = connection.execute(
            "SELECT job_id, event, time, pid, detail FROM history ORDER BY seq"
        ).fetchall()
        pending = {row[0] for row in connection.execute("SELECT id FROM jobs")}
        connection.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # created, but its schema not yet written
            return set()
        raise
    finally:
        connection.close()
    events.extend(
        JobEvent(job, event, stamp, pid, detail) for job, event, stamp, pid, detail in rows
    )
    return pending


# -- checking -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A job whose work may have been done more than once."""

    job: JobId
    #: Attempts that completed (acked, or recorded as complete).
    completed: int
    #: Attempts cut short: by the death of their process, or hard-cancelled and released.
    interrupted: int
    #: True when at most one attempt completed and every other was cut by the death
    #: of its process: the repeat that at-least-once delivery allows.
    in_flight_at_kill: bool


@dataclass(frozen=True, slots=True)
class LateStart:
    """A job that a process started after it was sent a drain signal."""

    job: JobId
    pid: int
    signal: str
    #: Seconds from the signal to the start.
    delay: float


@dataclass(frozen=True, slots=True)
class ExitTime:
    """How long a process took to exit after the first signal meant to stop it."""

    pid: int
    signal: str
    returncode: int
    seconds: float


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_history` found. ``ok`` is true when nothing is wrong."""

    enqueued: frozenset[JobId]
    acked: frozenset[JobId]
    dead: frozenset[JobId]
    #: Still waiting in a durable queue: neither done nor lost.
    pending: frozenset[JobId]
    #: Enqueued, never acked or dead-lettered, and not pending: gone.
    lost: tuple[JobId, ...]
    duplicated: tuple[Duplicate, ...]
    #: Claimed, started or settled, but never enqueued.
    unexpected: tuple[JobId, ...]
    started_after_signal: tuple[LateStart, ...]
    exit_times: tuple[ExitTime, ...]
    #: Jobs in flight in each killed process at its kill.
    in_flight_at_kill: Mapping[int, frozenset[JobId]] = field(default_factory=dict)

    @property
    def max_exit_seconds(self) -> float | None:
        """The longest time from a stop signal to the exit, None if nothing was stopped."""
        return max((t.seconds for t in self.exit_times), default=None)

    @property
    def unexplained_duplicates(self) -> tuple[Duplicate, ...]:
        """Duplicates that no kill explains."""
        return tuple(d for d in self.duplicated if not d.in_flight_at_kill)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing unexpected, every duplicate explained by a kill."""
        return not (self.lost or self.unexpected or self.unexplained_duplicates)

    def describe(self) -> str:
        """A few readable lines: the counts, then each problem with its job ids."""
        lines = [
            f"{len(self.enqueued)} enqueued, {len(self.acked)} acked, {len(self.dead)} dead, "
            f"{len(self.pending)} pending, {len(self.lost)} lost, "
            f"{len(self.duplicated)} duplicated ({len(self.unexplained_duplicates)} not in "
            f"flight at a kill), {len(self.unexpected)} unexpected, "
            f"{len(self.started_after_signal)} started after a drain signal"
        ]
        if self.lost:
            lines.append(f"lost: {_ids(self.lost)}")
        if self.unexplained_duplicates:
            lines.append(
                "duplicated, not in flight at a kill: "
                + _ids(d.job for d in self.unexplained_duplicates)
            )
        if self.unexpected:
            lines.append(f"unexpected (never enqueued): {_ids(self.unexpected)}")
        for late in self.started_after_signal[:10]:
            lines.append(
                f"job {late.job} started {late.delay:.3f} s after {late.signal} to pid {late.pid}"
            )
        for stop in self.exit_times:
            lines.append(
                f"pid {stop.pid} exited {stop.returncode} {stop.seconds:.3f} s after {stop.signal}"
            )
        return "\n".join(lines)


def job_order(job: JobId) -> tuple[int, int, str]:
    """A sort key for job ids: numbers in numeric order, then strings."""
    return (0, job, "") if isinstance(job, int) else (1, 0, str(job))


def _ids(jobs: Iterable[JobId], limit: int = 20) -> str:
    shown = sorted(jobs, key=job_order)
    text = ", ".join(str(job) for job in shown[:limit])
    return text + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


@dataclass
class _Attempt:
    pid: int
    taken: float
    started: float | None = None
    completed: bool = False
    end: str | None = None  # ack, release, fail, died


def check_history(history: History, *, signal_latency: float = 0.0) -> CheckReport:
    """Check *history*: lost, duplicated, unexpected, late starts, and times to exit.

    - **lost**: enqueued, but never acked nor dead-lettered, and not *pending* in a
      durable queue. Every process is assumed to have exited: what an in-memory
      queue held when its process ended is lost.
    - **duplicated**: more than one attempt that completed or was cut short while
      it may have been running (claimed by a process that then died, or started
      and then released). ``in_flight_at_kill`` tells the repeats that
      at-least-once delivery allows from the ones nothing explains.
    - **unexpected**: a job seen, but never enqueued.
    - **started after signal**: started by a process more than *signal_latency*
      seconds after it was sent SIGTERM or SIGINT, and not handed back unstarted.
      Without start records, a claim that was not released counts as the start.
    - **exit times**: from the first SIGTERM, SIGINT or SIGKILL sent to a process
      to its exit.
    """
    jobs: dict[JobId, list[JobEvent]] = defaultdict(list)
    for event in history.events:
        jobs[event.job].append(event)
    killed_at = {s.pid: s.time for s in history.signals if s.signal == "SIGKILL"}
    drained_at: dict[int, SignalSent] = {}
    for sent in history.signals:
        if sent.signal in DRAIN_SIGNALS and sent.pid not in drained_at:
            drained_at[sent.pid] = sent

    enqueued: set[JobId] = set()
    acked: set[JobId] = set()
    dead: set[JobId] = set()
    unexpected: list[JobId] = []
    duplicated: list[Duplicate] = []
    late: list[LateStart] = []
    in_flight_at_kill: dict[int, set[JobId]] = defaultdict(set)

    for job, events in jobs.items():
        attempts = _attempts(events)
        kinds = {event.event for event in events}
        if "enqueue" in kinds:
            enqueued.add(job)
        else:
            unexpected.append(job)
        if "ack" in kinds:
            acked.add(job)
        if "dead" in kinds:
            dead.add(job)
        for attempt in attempts:
            kill = killed_at.get(attempt.pid)
            if attempt.end == "died" and kill is not None and attempt.taken <= kill:
                in_flight_at_kill[attempt.pid].add(job)
        completed = [a for a in attempts if a.end == "ack" or a.completed]
        died = [a for a in attempts if a.end == "died" and not a.completed]
        cut = [
            a for a in attempts if a.end == "release" and a.started is not None and not a.completed
        ]
        if len(completed) + len(died) + len(cut) > 1:
            duplicated.append(
                Duplicate(
                    job,
                    completed=len(completed),
                    interrupted=len(died) + len(cut),
                    in_flight_at_kill=len(completed) <= 1 and not cut,
                )
            )
        for attempt in attempts:
            drain = drained_at.get(attempt.pid)
            if drain is None:
                continue
            started = attempt.started
            if started is None and attempt.end != "release":
                started = attempt.taken  # no start record: the claim stands for it
            if started is not None and started - drain.time > signal_latency:
                late.append(LateStart(job, attempt.pid, drain.signal, started - drain.time))

    pending = frozenset(history.pending) - acked - dead
    lost = tuple(sorted(enqueued - acked - dead - pending, key=job_order))
    return CheckReport(
        enqueued=frozenset(enqueued),
        acked=frozenset(acked),
        dead=frozenset(dead),
        pending=pending,
        lost=lost,
        duplicated=tuple(sorted(duplicated, key=lambda d: job_order(d.job))),
        unexpected=tuple(sorted(unexpected, key=job_order)),
        started_after_signal=tuple(sorted(late, key=lambda s: (s.pid, s.delay))),
        exit_times=_exit_times(history),
        in_flight_at_kill={pid: frozenset(ids) for pid, ids in in_flight_at_kill.items()},
    )


def _attempts(events: list[JobEvent]) -> list[_Attempt]:
    """A job's attempts: each from its claim (or start) to how it ended."""
    attempts: list[_Attempt] = []
    current: _Attempt | None = None
    for event in events:
        kind = event.event
        if kind == "claim" or (kind == "start" and current is None):
            if current is not None:  # taken again with no settle seen: the holder died
                current.end = "died"
            current = _Attempt(event.pid, event.time)
            attempts.append(current)
            if kind == "start":
                current.started = event.time
        elif current is None:
            continue
        elif kind == "start":
            current.started = event.time
        elif kind == "complete":
            current.completed = True
        elif kind in ("ack", "release", "fail"):
            current.end = kind
            current = None
        elif kind == "recover":
            current.end = "died"
            current = None
    if current is not None:  # still held at the end: its process is gone
        current.end = "died"
    return attempts


def _exit_times(history: History) -> tuple[ExitTime, ...]:
    first_stop: dict[int, SignalSent] = {}
    for sent in history.signals:
        if (sent.signal in DRAIN_SIGNALS or sent.signal == "SIGKILL") and (
            sent.pid not in first_stop
        ):
            first_stop[sent.pid] = sent
    times = []
    for gone in history.exits:
        stop = first_stop.get(gone.pid)
        if stop is not None:
            seconds = max(0.0, gone.time - stop.time)
            times.append(ExitTime(gone.pid, stop.signal, gone.returncode, seconds))
    return tuple(times)
