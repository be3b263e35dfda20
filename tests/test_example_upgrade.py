"""examples/queue_worker.py upgraded twice while it works: no gap, nothing lost or run twice.

A SIGUSR2 starts the next generation of the program; once it is ready the old one
drains and exits 0, and for the length of that drain both generations consume the one
SQLite queue. Leases keep every job to one of them: at the end every job put is acked
exactly once, nothing is dead, and no lease was ever taken back from a live process.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nursery_down.testing._harness import process_running
from tests.polling import wait_for_line
from tests.test_example_restart import (
    GRACE,
    PATIENCE,
    STARTED,
    TROUBLE,
    Worker,
    assert_every_job_acked_once,
    leased,
    remaining,
    working,
)

pytestmark = pytest.mark.subprocess

HANDED_OVER = re.compile(r"upgrade: the new generation \(pid (\d+)\) is ready; draining this one")


def wait_gone(pid: int, worker: Worker) -> None:
    deadline = time.monotonic() + GRACE + PATIENCE
    while process_running(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still runs: {worker.describe()}")
        time.sleep(0.02)


def wait_while_running(pid: int, worker: Worker, what: str, condition: Callable[[], bool]) -> None:
    """Poll until *condition* holds; fail if generation *pid* exits first or it stalls."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if not process_running(pid):
            raise AssertionError(f"pid {pid} exited while waiting for {what}: {worker.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {PATIENCE} s: {worker.describe()}")
        time.sleep(0.02)


def handed_over(worker: Worker, times: int) -> Callable[[], bool]:
    """A condition: *times* hand-overs to a new generation are in the log."""
    return lambda: len(HANDED_OVER.findall(worker.output())) >= times


def test_two_upgrades_under_load_lose_and_repeat_no_job(tmp_path: Path) -> None:
    queue_path = tmp_path / "queue.sqlite3"
    worker = Worker(queue_path, tmp_path / "run.log", rate=30)
    newest = worker.process.pid
    try:
        wait_for_line(worker.log, STARTED, timeout=PATIENCE)
        generations = [newest]
        for upgrade in (1, 2):
            wait_while_running(
                newest, worker, f"work before upgrade {upgrade}", working(queue_path, busy=True)
            )
            os.kill(newest, signal.SIGUSR2)
            wait_while_running(
                newest, worker, f"the hand-over of upgrade {upgrade}", handed_over(worker, upgrade)
            )
            pids = [int(m) for m in HANDED_OVER.findall(worker.output())]
            assert len(pids) == upgrade, worker.describe()
            previous, newest = newest, pids[-1]
            generations.append(newest)
            wait_gone(previous, worker)  # the old generation drained and exited
            if previous == worker.process.pid:
                assert worker.process.wait(PATIENCE) == 0, worker.describe()
            wait_for_line(
                worker.log, rf"the previous generation \(pid {previous}\) has exited", PATIENCE
            )
        # The newest generation works on: more jobs acked after the last upgrade.
        wait_while_running(
            newest, worker, "work after the upgrades", working(queue_path, busy=False)
        )
        os.kill(newest, signal.SIGTERM)
        wait_gone(newest, worker)
    finally:
        for pid in (newest, worker.process.pid):
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)
        worker.stop()
    output = worker.output()
    assert TROUBLE.search(output) is None, worker.describe()
    # Every generation stopped cleanly: three "stopped, exit code 0" lines.
    assert output.count("stopped, exit code 0") == 3, worker.describe()
    assert len(set(generations)) == 3
    assert leased(queue_path) == 0, "clean drains leave no lease behind"

    if remaining(queue_path):
        finisher = Worker(queue_path, tmp_path / "finish.log", rate=0)
        try:
            wait_for_line(finisher.log, STARTED, timeout=PATIENCE)
            finisher.wait_until("an empty queue", lambda: remaining(queue_path) == 0)
            finisher.send(signal.SIGTERM)
            assert finisher.wait_exit() == 0, finisher.describe()
        finally:
            finisher.stop()

    # Two live generations shared the file: neither took back the other's leases.
    assert_every_job_acked_once(queue_path)
