"""examples/queue_worker.py: SIGTERM finishes the work in flight; SIGKILL loses nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nursery_down.queues import QueueStatistics, SQLiteQueue
from tests.polling import PATIENCE, wait_for, wait_for_line

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "queue_worker.py"

pytestmark = pytest.mark.subprocess


def start(queue_path: Path, log: Path, *, rate: str = "50") -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "QUEUE_PATH": str(queue_path),
        "QUEUE_RATE": rate,
        "QUEUE_JOB_SECONDS": "0.4",
        "QUEUE_DASHBOARD": "off",
    }
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, str(EXAMPLE)], stdout=output, stderr=subprocess.STDOUT, env=env
        )


def statistics(queue_path: Path) -> QueueStatistics:
    async def read() -> QueueStatistics:
        async with SQLiteQueue(queue_path) as queue:  # opening requeues orphaned leases
            return await queue.statistics()

    return trio.run(read)


def test_sigterm_finishes_in_flight_messages_and_exits_0(tmp_path: Path) -> None:
    queue_path, log = tmp_path / "q.sqlite3", tmp_path / "run.log"
    worker = start(queue_path, log, rate="100")
    try:
        wait_for_line(log, "every service started", process=worker)
        # A backlog builds (100 messages/s, 20 workers, 0.4 s each) while jobs get done.
        wait_for(
            lambda: backlog_and_work_done(queue_path),
            what="20 messages done and 20 waiting",
            process=worker,
        )
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = log.read_text()
    assert "Traceback" not in output
    stats = statistics(queue_path)
    assert stats.leased == 0  # every message in flight was acked before the exit
    assert stats.done >= 20
    assert stats.queued > 0  # the backlog waits in the queue for the next run


def test_sigkill_loses_nothing_and_the_next_run_finishes_the_work(tmp_path: Path) -> None:
    queue_path, log = tmp_path / "q.sqlite3", tmp_path / "run.log"
    worker = start(queue_path, log)
    try:
        wait_for_line(log, "every service started", process=worker)
        # Work under way: messages done, and messages leased that the kill will orphan.
        wait_for(
            lambda: work_done_and_in_flight(queue_path),
            what="messages done and messages in flight",
            process=worker,
        )
    finally:
        worker.kill()  # SIGKILL: no drain, leases left behind
        worker.wait()
    # Opening the queue requeued the dead process's leases: none is lost.
    stats = statistics(queue_path)
    assert stats.leased == 0
    assert stats.queued > 0
    produced = stats.queued + stats.done
    second_log = tmp_path / "second.log"
    rerun = start(queue_path, second_log, rate="0")
    try:
        wait_for(lambda: emptied(queue_path), what="an empty queue", process=rerun)
        rerun.send_signal(signal.SIGTERM)
        assert rerun.wait(timeout=20) == 0
    finally:
        if rerun.poll() is None:
            rerun.kill()
            rerun.wait()
    final = statistics(queue_path)
    assert (final.queued, final.leased, final.done) == (0, 0, produced)


def live_statistics(queue_path: Path) -> QueueStatistics:
    """The counts now, read with plain sqlite3 so that the running worker's leases stay
    (opening an SQLiteQueue requeues the leases of processes that are gone)."""
    connection = sqlite3.connect(queue_path, timeout=PATIENCE, isolation_level=None)
    try:
        connection.execute("BEGIN")  # one read transaction: the counts of one instant
        counts = dict(connection.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
        (done,) = connection.execute("SELECT value FROM counters WHERE name = 'done'").fetchone()
        (dead,) = connection.execute("SELECT count(*) FROM dead_letters").fetchone()
        connection.execute("COMMIT")
    finally:
        connection.close()
    return QueueStatistics(
        queued=counts.get("queued", 0), leased=counts.get("leased", 0), done=done, dead=dead
    )


def backlog_and_work_done(queue_path: Path) -> bool:
    now = live_statistics(queue_path)
    return now.done >= 20 and now.queued >= 20


def work_done_and_in_flight(queue_path: Path) -> bool:
    now = live_statistics(queue_path)
    return now.done > 0 and now.leased > 0


def emptied(queue_path: Path) -> bool:
    now = live_statistics(queue_path)
    return now.queued == 0 and now.leased == 0
