"""An upgrade against a plain restart (SIGTERM, then start again), in the same run.

1. HTTP under load: ``examples/http_service.py`` on a fixed port; one client makes
   about 100 requests a second, each on a new connection, for the whole measurement.
   Halfway the program is upgraded (SIGUSR2: the new generation inherits the socket),
   or, for the baseline, stopped with SIGTERM and started again. Reported: failed
   requests (refused, reset, or a 503 from the draining process) and the longest
   gap between two answered requests.
2. The queue worker at the seed scenario's rate (``examples/queue_worker.py``: about
   20 messages a second, 3 s jobs, 20 workers): the longest gap between two claims
   around the upgrade (or the restart), and, from the queue's history, jobs lost and
   jobs run twice.

Run: ``python benchmarks/upgrade.py`` (about 60 s); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nursery_down.testing import check_history, read_history
from nursery_down.testing._harness import process_running

ROOT = Path(__file__).resolve().parent.parent
HTTP_EXAMPLE = ROOT / "examples" / "http_service.py"
QUEUE_EXAMPLE = ROOT / "examples" / "queue_worker.py"
QUICK = "--quick" in sys.argv
HTTP_SECONDS = 2.0 if QUICK else 6.0
QUEUE_SECONDS = 4.0 if QUICK else 12.0
HANDED_OVER = re.compile(r"upgrade: the new generation \(pid (\d+)\) is ready")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark stalled waiting for {what}")
        time.sleep(0.01)


class Program:
    """One example run; generations that an upgrade starts write to the same log."""

    def __init__(self, script: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.env = {**os.environ, **env}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "NURSERY_DOWN_TOKEN"):
            self.env.pop(name, None)
        self.script = script
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pid = self.start()

    def start(self) -> int:
        with self.log.open("ab") as output:
            process = subprocess.Popen(
                [sys.executable, str(self.script)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def upgrade(self) -> None:
        before = len(HANDED_OVER.findall(self.text()))
        os.kill(self.pid, signal.SIGUSR2)
        wait_for(lambda: len(HANDED_OVER.findall(self.text())) > before, "the hand-over")
        old, self.pid = self.pid, int(HANDED_OVER.findall(self.text())[-1])
        wait_for(lambda: not process_running(old), "the old generation to exit")

    def restart(self, ready: str) -> None:
        before = self.text().count(ready)
        os.kill(self.pid, signal.SIGTERM)
        wait_for(lambda: not process_running(self.pid), "the old process to exit")
        self.pid = self.start()
        wait_for(lambda: self.text().count(ready) > before, "the new process")

    def stop(self) -> None:
        if process_running(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            wait_for(lambda: not process_running(self.pid), "the last process to exit", 60)
        for process in self.processes:
            process.wait(30)


def http_round(folder: Path, how: str) -> tuple[int, int, float]:
    """(requests, failed, longest gap in seconds) across one upgrade or restart."""
    port = free_port()
    program = Program(
        HTTP_EXAMPLE,
        folder / f"http-{how}.log",
        {"HTTP_ADDRESS": f"127.0.0.1:{port}", "HTTP_GRACE": "5", "HTTP_PRE_DRAIN": "0"},
    )
    wait_for(lambda: "serving on" in program.text(), "the HTTP example")
    answered: list[float] = []
    failed = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal failed
        while not stop.is_set():
            began = time.monotonic()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/work?seconds=0")
                status = connection.getresponse().status
                connection.close()
            except OSError:
                status = 0
            if status == 200:
                answered.append(time.monotonic())
            else:
                failed += 1
            time.sleep(max(0.0, 0.01 - (time.monotonic() - began)))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(HTTP_SECONDS / 2)
    if how == "upgrade":
        program.upgrade()
    else:
        program.restart("serving on")
    time.sleep(HTTP_SECONDS / 2)
    stop.set()
    thread.join(10)
    program.stop()
    gaps = [b - a for a, b in itertools.pairwise(answered)]
    return len(answered) + failed, failed, max(gaps, default=0.0)


def claims(queue: Path) -> list[tuple[float, int]]:
    """Every claim: (time, pid of the process that claimed)."""
    connection = sqlite3.connect(f"{queue.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT time, pid FROM history WHERE event = 'claim' ORDER BY time"
        )
        return [(float(row[0]), int(row[1])) for row in rows]
    finally:
        connection.close()


def queue_round(folder: Path, how: str) -> tuple[float, float, int, int, int]:
    """(seconds from the switch to the new process's first claim, the old one's last
    claim to that, jobs, lost, run twice)."""
    queue = folder / f"queue-{how}.sqlite3"
    program = Program(
        QUEUE_EXAMPLE,
        folder / f"queue-{how}.log",
        {
            "QUEUE_PATH": str(queue),
            "QUEUE_DASHBOARD": "off",
            "QUEUE_RATE": "20",
            "QUEUE_JOB_SECONDS": "3",
            "QUEUE_WORKERS": "20",
            "QUEUE_GRACE": "30",
        },
    )
    ready = "every service started"
    wait_for(lambda: ready in program.text(), "the queue worker")
    time.sleep(QUEUE_SECONDS / 2)
    switched = time.time()
    old = program.pid
    if how == "upgrade":
        program.upgrade()
    else:
        program.restart(ready)
    time.sleep(QUEUE_SECONDS / 2)
    program.stop()
    # A last run with no producer finishes what is left, so that nothing is pending.
    finisher = Program(
        QUEUE_EXAMPLE,
        folder / f"queue-{how}-finish.log",
        {**program.env, "QUEUE_RATE": "0", "QUEUE_JOB_SECONDS": "0"},
    )
    wait_for(lambda: ready in finisher.text(), "the finishing run")
    connection = sqlite3.connect(queue)
    try:
        wait_for(
            lambda: connection.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0,
            "an empty queue",
            60,
        )
    finally:
        connection.close()
    finisher.stop()
    new = program.pid
    every = claims(queue)
    first_new = min((t for t, pid in every if pid == new), default=float("nan"))
    last_old = max((t for t, pid in every if pid == old), default=float("nan"))
    report = check_history(read_history(sqlite=queue))
    return (
        first_new - switched,
        first_new - last_old,
        len(report.enqueued),
        len(report.lost),
        len(report.duplicated),
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        print("HTTP under load (about 100 requests/s, a new connection each)")
        for how in ("upgrade", "restart"):
            total, failed, gap = http_round(folder, how)
            print(
                f"  {how:8}  requests {total:5}  failed {failed:4}  "
                f"longest gap between answers {gap * 1000:7.1f} ms"
            )
        print("\nqueue worker, 20 messages/s, 3 s jobs, 20 workers")
        for how in ("upgrade", "restart"):
            first, gap, jobs, lost, twice = queue_round(folder, how)
            print(
                f"  {how:8}  new process's first claim {first:5.2f} s after the switch "
                f"({gap:+5.2f} s after the old one's last)  jobs {jobs:4}  lost {lost}  "
                f"run twice {twice}"
            )
        print(
            "\n(a negative gap: the new process claimed while the old one still did; the"
            "\nold one stops claiming the moment its drain begins)"
        )


if __name__ == "__main__":
    main()
