"""examples/queue_worker.py as a real process: three SIGHUPs, then SIGTERM, and not one job
lost, run twice or dead.

A SIGHUP restarts every service in turn (producer, workers, then the queue that they
use, which closes its file and opens it again) while jobs are in flight; the process
stays up and keeps working. The producer outruns the workers, so every worker is busy
at every signal and a backlog waits in the queue at the end. After the SIGTERM a
second run (adding nothing) finishes the backlog; then the queue's ``history`` table
must show every job put acked exactly once, with nothing dead and nothing recovered
from a dead process. Both runs exit 0, which also says that no job was ever
hard-cancelled, so each ``release`` in the history is a job handed back unstarted.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nursery_down.testing import CheckReport, check_history, read_history
from tests.polling import wait_for_line

pytestmark = pytest.mark.subprocess

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "queue_worker.py"
WORKERS = 5
JOB_SECONDS = 0.3
GRACE = 10.0
RESTARTS = 3
#: Every wait on the program has this bound, so a hang fails instead of stalling.
PATIENCE = 30.0

STARTED = "app queue-worker: every service started"
RESTARTED = "app queue-worker: every service restarted"
#: Written by the supervisor when a service crashes or a restart goes wrong.
TROUBLE = re.compile(r"crashed|Traceback|-> backoff|-> failed|rolling restart (ended|cancelled)")


class Worker:
    """One run of the example, its stdout and stderr (the supervisor's log) in one file."""

    def __init__(self, queue_path: Path, log: Path, *, rate: float) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        env.update(
            QUEUE_PATH=str(queue_path),
            QUEUE_DASHBOARD="off",
            QUEUE_RATE=str(rate),
            QUEUE_JOB_SECONDS=str(JOB_SECONDS),
            QUEUE_WORKERS=str(WORKERS),
            QUEUE_GRACE=str(GRACE),
        )
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(EXAMPLE)],
                env=env,
                cwd=log.parent,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def describe(self) -> str:
        return f"pid {self.process.pid}; output:\n{self.output()[-6000:]}"

    def wait_until(self, what: str, condition: Callable[[], bool]) -> None:
        """Poll until *condition* holds; fail if the process exits first or stalls."""
        deadline = time.monotonic() + PATIENCE
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"exited while waiting for {what}: {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {PATIENCE} s: {self.describe()}")
            time.sleep(0.02)

    def send(self, signum: signal.Signals) -> None:
        assert self.process.poll() is None, f"exited before {signum.name}: {self.describe()}"
        self.process.send_signal(signum)

    def wait_exit(self) -> int:
        try:
            return self.process.wait(timeout=GRACE + PATIENCE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after SIGTERM: {self.describe()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(PATIENCE)


def query(queue_path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the queue file with plain sqlite3 (read-only: the worker's leases stay)."""
    if not queue_path.exists():
        return []
    connection = sqlite3.connect(f"{queue_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return list(connection.execute(sql))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # created, its schema not yet written
            return []
        raise
    finally:
        connection.close()


def acked(queue_path: Path) -> int:
    rows = query(queue_path, "SELECT count(*) FROM history WHERE event = 'ack'")
    return int(str(rows[0][0])) if rows else 0


def leased(queue_path: Path) -> int:
    """Jobs leased now: claimed by the worker pool and not yet settled."""
    rows = query(queue_path, "SELECT count(*) FROM jobs WHERE state = 'leased'")
    return int(str(rows[0][0])) if rows else 0


def remaining(queue_path: Path) -> int:
    rows = query(queue_path, "SELECT count(*) FROM jobs")
    return int(str(rows[0][0])) if rows else 0


def working(queue_path: Path, *, busy: bool) -> Callable[[], bool]:
    """A condition: jobs acked from now on (two rounds of the workers), and if *busy*
    every worker busy at that moment."""
    floor = acked(queue_path) + 2 * WORKERS

    def condition() -> bool:
        return acked(queue_path) >= floor and (not busy or leased(queue_path) >= WORKERS)

    return condition


def restarted(worker: Worker, times: int) -> Callable[[], bool]:
    """A condition: the supervisor logged the end of *times* whole-app restarts."""
    return lambda: worker.output().count(RESTARTED) >= times


def assert_every_job_acked_once(queue_path: Path) -> CheckReport:
    """The queue's history shows every job put acked exactly once: none lost, none run
    twice, none failed or dead, and no lease taken back from a process."""
    history = read_history(sqlite=queue_path)
    report = check_history(history)
    assert report.ok, report.describe()
    assert report.enqueued, report.describe()
    assert report.acked == report.enqueued, report.describe()
    assert not report.lost, report.describe()
    assert not report.dead, report.describe()
    assert not report.pending, report.describe()
    assert not report.duplicated, report.describe()
    acks = collections.Counter(event.job for event in history.events if event.event == "ack")
    twice = sorted(job for job, count in acks.items() if count != 1)
    assert not twice, f"jobs acked more than once: {twice}"
    kinds = {event.event for event in history.events}
    assert not kinds & {"fail", "dead", "recover"}, kinds
    assert query(queue_path, "SELECT count(*) FROM dead_letters") == [(0,)]
    return report


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Runs of the example; any still running at the end of the test is killed."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


def test_three_sighups_then_sigterm_lose_and_repeat_no_job(
    tmp_path: Path, workers: list[Worker]
) -> None:
    queue_path = tmp_path / "queue.sqlite3"
    # 30 messages a second for 5 workers of 0.3 s (about 17 a second): a backlog builds.
    worker = Worker(queue_path, tmp_path / "run.log", rate=30)
    workers.append(worker)
    wait_for_line(worker.log, STARTED, timeout=PATIENCE)
    for restart in range(1, RESTARTS + 1):
        # Work under way: jobs acked since the last restart and every worker busy.
        worker.wait_until(f"work before SIGHUP {restart}", working(queue_path, busy=True))
        worker.send(signal.SIGHUP)
        worker.wait_until(f"restart {restart} completed", restarted(worker, restart))
        output = worker.output()
        assert output.count(RESTARTED) == restart, worker.describe()
        assert output.count("received SIGHUP") == restart, worker.describe()
        trouble = TROUBLE.search(output)
        assert trouble is None, f"{trouble.group(0)!r} after SIGHUP {restart}: {worker.describe()}"
    # The restarted services work: more jobs acked after the last restart.
    worker.wait_until("work after the last restart", working(queue_path, busy=False))
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0, worker.describe()
    output = worker.output()
    assert TROUBLE.search(output) is None, worker.describe()
    assert "every service restarted" in output
    assert leased(queue_path) == 0, "a clean drain leaves no lease behind"
    backlog = remaining(queue_path)
    assert backlog > 0, "the producer should have outrun the workers"

    # A second run adds nothing and finishes the backlog.
    finisher = Worker(queue_path, tmp_path / "finish.log", rate=0)
    workers.append(finisher)
    wait_for_line(finisher.log, STARTED, timeout=PATIENCE)
    finisher.wait_until("an empty queue", lambda: remaining(queue_path) == 0)
    finisher.send(signal.SIGTERM)
    assert finisher.wait_exit() == 0, finisher.describe()
    assert TROUBLE.search(finisher.output()) is None, finisher.describe()

    report = assert_every_job_acked_once(queue_path)
    assert query(queue_path, "SELECT value FROM counters WHERE name = 'done'") == [
        (len(report.enqueued),)
    ]
