"""The history checker on hand-built histories, and the recorders that write histories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from nursery_down.queues import MemoryQueue, SQLiteQueue
from nursery_down.testing import (
    CheckReport,
    Duplicate,
    History,
    HistoryRecorder,
    JobEvent,
    ProcessExit,
    RecordingSource,
    SignalSent,
    check_history,
    read_history,
)


def history(
    *events: tuple[int, str, float, int],
    signals: tuple[tuple[int, str, float], ...] = (),
    exits: tuple[tuple[int, int, float], ...] = (),
    pending: frozenset[int] = frozenset(),
) -> History:
    """A History from (job, event, time, pid) tuples, in time order."""
    return History(
        tuple(JobEvent(job, kind, when, pid) for job, kind, when, pid in events),
        tuple(SignalSent(*s) for s in signals),
        tuple(ProcessExit(*e) for e in exits),
        pending,
    )


def done(job: int, start: float, pid: int = 1) -> list[tuple[int, str, float, int]]:
    """One job enqueued, claimed and acked by *pid*, from *start* on."""
    return [
        (job, "enqueue", start, 9),
        (job, "claim", start + 0.1, pid),
        (job, "ack", start + 0.2, pid),
    ]


def test_a_clean_history_is_ok() -> None:
    report = check_history(history(*done(1, 0.0), *done(2, 1.0)))
    assert report.ok
    assert report.acked == {1, 2}
    assert (report.lost, report.duplicated, report.unexpected) == ((), (), ())
    assert report.started_after_signal == ()


def test_a_job_never_acked_and_not_pending_is_lost() -> None:
    report = check_history(history(*done(1, 0.0), (2, "enqueue", 0.5, 9), (2, "claim", 0.6, 1)))
    assert report.lost == (2,)
    assert not report.ok
    assert "lost: 2" in report.describe()


def test_a_job_still_waiting_in_a_durable_queue_is_pending_not_lost() -> None:
    report = check_history(history(*done(1, 0.0), (2, "enqueue", 0.5, 9), pending=frozenset({2})))
    assert report.lost == ()
    assert report.pending == {2}
    assert report.ok


def test_dead_lettered_jobs_are_not_lost() -> None:
    events = [(3, "enqueue", 0.0, 9)]
    for attempt in range(3):
        events += [(3, "claim", 1.0 + attempt, 1), (3, "fail", 1.5 + attempt, 1)]
    events.append((3, "dead", 3.5, 1))
    report = check_history(history(*events))
    assert report.dead == {3}
    assert report.ok
    assert report.duplicated == ()  # retries after failures are not duplicates


def test_a_job_repeated_after_a_kill_is_a_duplicate_in_flight_at_the_kill() -> None:
    report = check_history(
        history(
            (1, "enqueue", 0.0, 9),
            (1, "claim", 0.1, 100),  # pid 100 is killed at 0.2, holding it
            (1, "recover", 0.5, 200),
            (1, "claim", 0.6, 200),
            (1, "ack", 0.7, 200),
            signals=((100, "SIGKILL", 0.2),),
            exits=((100, -9, 0.21), (200, 0, 1.0)),
        )
    )
    assert report.duplicated == (Duplicate(1, completed=1, interrupted=1, in_flight_at_kill=True),)
    assert report.in_flight_at_kill == {100: frozenset({1})}
    assert report.ok  # at-least-once allows this repeat
    assert report.lost == ()


def test_a_job_acked_twice_is_a_duplicate_not_in_flight_at_a_kill() -> None:
    report = check_history(
        history(
            (1, "enqueue", 0.0, 9),
            (1, "claim", 0.1, 100),
            (1, "ack", 0.2, 100),
            (1, "claim", 0.3, 100),
            (1, "ack", 0.4, 100),
        )
    )
    assert report.duplicated == (Duplicate(1, completed=2, interrupted=0, in_flight_at_kill=False),)
    assert not report.ok
    assert "not in flight at a kill: 1" in report.describe()


def test_a_job_completed_then_killed_before_its_ack_counts_as_completed() -> None:
    # The handler finished (recorded "complete"), the kill came before the ack, and the
    # job ran again: done twice, and nothing but the kill explains it.
    report = check_history(
        history(
            (1, "enqueue", 0.0, 9),
            (1, "claim", 0.1, 100),
            (1, "start", 0.1, 100),
            (1, "complete", 0.2, 100),
            (1, "claim", 0.5, 200),
            (1, "start", 0.5, 200),
            (1, "complete", 0.6, 200),
            (1, "ack", 0.6, 200),
            signals=((100, "SIGKILL", 0.25),),
        )
    )
    (duplicate,) = report.duplicated
    assert (duplicate.completed, duplicate.interrupted) == (2, 0)
    assert not duplicate.in_flight_at_kill


def test_a_job_never_enqueued_is_unexpected() -> None:
    report = check_history(history(*done(1, 0.0), (7, "claim", 0.5, 1), (7, "ack", 0.6, 1)))
    assert report.unexpected == (7,)
    assert not report.ok
    assert "unexpected (never enqueued): 7" in report.describe()


def test_a_job_started_after_a_drain_signal_is_reported() -> None:
    report = check_history(
        history(
            *done(1, 0.0, pid=100),
            (2, "enqueue", 0.5, 9),
            (2, "claim", 2.5, 100),  # claimed and run 0.5 s after the SIGTERM
            (2, "ack", 2.6, 100),
            (3, "enqueue", 0.5, 9),
            (3, "claim", 2.1, 100),  # claimed after it too, but handed back unstarted
            (3, "release", 2.1, 100),
            signals=((100, "SIGTERM", 2.0),),
            exits=((100, 0, 2.7),),
            pending=frozenset({3}),
        )
    )
    (late,) = report.started_after_signal
    assert (late.job, late.pid, late.signal) == (2, 100, "SIGTERM")
    assert late.delay == pytest.approx(0.5)
    assert report.ok  # reported, but nothing was lost
    assert "job 2 started 0.500 s after SIGTERM to pid 100" in report.describe()
    # A start within the allowed latency of the signal is not counted.
    assert not check_history(
        report_history_with_start_at(2.05), signal_latency=0.1
    ).started_after_signal


def report_history_with_start_at(when: float) -> History:
    return history(
        (1, "enqueue", 0.0, 9),
        (1, "claim", when, 100),
        (1, "ack", when + 0.1, 100),
        signals=((100, "SIGINT", 2.0),),
    )


def test_start_records_decide_when_a_job_started() -> None:
    # Claimed before the signal, started after it: a late start.
    report = check_history(
        history(
            (1, "enqueue", 0.0, 9),
            (1, "claim", 0.9, 100),
            (1, "start", 1.5, 100),
            (1, "complete", 1.6, 100),
            (1, "ack", 1.6, 100),
            signals=((100, "SIGTERM", 1.0),),
        )
    )
    assert [late.job for late in report.started_after_signal] == [1]


def test_time_from_signal_to_exit() -> None:
    report = check_history(
        history(
            *done(1, 0.0, pid=100),
            signals=((100, "SIGHUP", 0.5), (100, "SIGTERM", 1.0), (100, "SIGTERM", 1.2)),
            exits=((100, 3, 1.75), (200, 0, 3.0)),
        )
    )
    (stop,) = report.exit_times
    assert (stop.pid, stop.signal, stop.returncode) == (100, "SIGTERM", 3)
    assert stop.seconds == pytest.approx(0.75)
    assert report.max_exit_seconds == pytest.approx(0.75)
    assert check_history(History()).max_exit_seconds is None


def test_in_flight_follows_claims_and_settles() -> None:
    recorded = history(
        (1, "claim", 0.1, 100),
        (2, "claim", 0.2, 100),
        (3, "claim", 0.3, 200),
        (1, "ack", 0.4, 100),
        (4, "start", 0.5, 100),
    )
    assert recorded.in_flight(100) == {2: 0.2, 4: 0.5}
    assert recorded.in_flight() == {2: 0.2, 3: 0.3, 4: 0.5}


def test_recorder_lines_survive_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    with HistoryRecorder(path) as recorder:
        recorder.record(1, "enqueue")
        recorder.record("a", "claim")
        recorder.record_signal(4321, "SIGKILL", when=5.0)
        recorder.record_exit(4321, -9, when=5.5)
        with pytest.raises(ValueError, match="unknown job event"):
            recorder.record(1, "finished")
    # A writer killed mid-line leaves a partial last line: ignored.
    with open(path, "a") as file:
        file.write('{"job": 2, "event": "ack"')
    read = read_history(path, tmp_path / "no-such-queue.sqlite3")
    assert [(e.job, e.event) for e in read.events] == [(1, "enqueue"), ("a", "claim")]
    assert read.signals == (SignalSent(4321, "SIGKILL", 5.0),)
    assert read.exits == (ProcessExit(4321, -9, 5.5),)
    with pytest.raises(ValueError, match="closed"):
        recorder.record(1, "ack")


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('not json\n{"job": 1, "event": "ack", "time": 1, "pid": 2}\n')
    with pytest.raises(ValueError, match=r"history\.jsonl:1: not a history record"):
        read_history(path)


async def test_recording_source_records_every_event(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    queue = RecordingSource(MemoryQueue(max_attempts=2), path)
    first = queue.put_nowait({"n": 1})
    second = await queue.put({"n": 2})
    third = queue.put_nowait({"n": 3})

    async def handler(job: object) -> None:
        await trio.lowlevel.checkpoint()

    recorded_handler = queue.wrap(handler)
    job = await queue.claim()
    assert job is not None
    await recorded_handler(job)
    await queue.ack(job)
    job = await queue.claim()
    assert job is not None
    await queue.release(job)  # back, unstarted
    job = await queue.claim()
    assert job is not None
    await queue.fail(job, ValueError("bad"))  # retried later: behind the third job
    held = await queue.claim()
    assert held is not None
    assert held.id == third
    job = await queue.claim()
    assert job is not None
    await queue.fail(job, ValueError("bad"))  # its second failure: dead

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["job"], line["event"]) for line in lines] == [
        (first, "enqueue"),
        (second, "enqueue"),
        (third, "enqueue"),
        (first, "claim"),
        (first, "start"),
        (first, "complete"),
        (first, "ack"),
        (second, "claim"),
        (second, "release"),
        (second, "claim"),
        (second, "fail"),
        (third, "claim"),
        (second, "claim"),
        (second, "fail"),
        (second, "dead"),
    ]
    assert lines[-1]["detail"] == "ValueError: bad"
    report = check_history(read_history(path))
    # The in-memory job still held when "the process ended" is lost: nothing kept it.
    assert report.lost == (third,)
    assert report.dead == {second}


async def test_the_sqlite_queue_history_is_read_without_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    async with SQLiteQueue(path) as queue:
        ids = await queue.put_many([{"n": n} for n in range(3)])
        job = await queue.claim()
        assert job is not None
        await queue.ack(job)
        job = await queue.claim()
        assert job is not None  # left leased when the queue... is closed: released
    report: CheckReport = await trio.to_thread.run_sync(
        lambda: check_history(read_history(None, path))
    )
    assert report.enqueued == set(ids)
    assert report.acked == {ids[0]}
    assert report.pending == {ids[1], ids[2]}  # still in the durable queue
    assert report.ok
