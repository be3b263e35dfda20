"""Start a target program, wait until it is ready, signal it at chosen instants, clean up."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .._closing import ClosesOnExit
from ._history import (
    HISTORY_ENV,
    CheckReport,
    History,
    HistoryRecorder,
    JobId,
    ProcessExit,
    SignalSent,
    check_history,
    job_order,
    read_history,
)

T = TypeVar("T")

#: The line ``nursery-down run`` logs once every service is ready.
READY_LINE = "every service started"
#: The line ``nursery-down run`` logs when a whole-app drain begins.
DRAIN_LINE = "draining every service"
#: How often waits look again, in seconds.
POLL_INTERVAL = 0.01


class TargetError(AssertionError):
    """A target program did not do what a wait expected (exited early, never got ready...).

    An ``AssertionError``, so pytest shows it as a test failure; the message ends
    with the last lines of the target's output.
    """


def signal_of(name: str | int | signal.Signals) -> signal.Signals:
    """``"TERM"``, ``"SIGTERM"``, ``15`` or ``signal.SIGTERM`` -> ``signal.SIGTERM``."""
    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int):
        return signal.Signals(name)
    text = name.strip().upper()
    try:
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except KeyError:
        raise ValueError(
            f"unknown signal {name!r}; use a name such as TERM, INT, HUP or KILL"
        ) from None


def process_running(pid: int) -> bool:
    """True while *pid* runs. A zombie nobody reaps runs no code: not running.

    For processes the harness did not start itself, such as the new generation an
    upgrade starts (Linux: reads ``/proc``).
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()
    except OSError:
        return False


class Target:
    """One run of a target program, started by :meth:`ChaosHarness.start`.

    It runs in its own process group, with its output (stdout and stderr) in
    :attr:`output_path`. Every signal sent and the exit are written to the
    harness's history file, so the checker knows when they happened.
    """

    def __init__(
        self,
        harness: ChaosHarness,
        argv: Sequence[str],
        env: Mapping[str, str],
        output_path: Path,
        snapshot_url: str | None,
    ) -> None:
        self.harness = harness
        self.argv = list(argv)
        self.output_path = output_path
        self.snapshot_url = snapshot_url
        self._token = env.get("NURSERY_DOWN_TOKEN")
        #: ``time.time()`` just before the process was started.
        self.started = time.time()
        with open(output_path, "wb") as sink:
            self.process = subprocess.Popen(
                self.argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: leftovers can be killed together
            )
        self.pid = self.process.pid
        self.signals: list[SignalSent] = []
        self.exit: ProcessExit | None = None
        self._exited = threading.Event()
        # A watcher sees the exit the instant it happens, whoever waits for it later.
        self._watcher = threading.Thread(
            target=self._watch, name=f"nursery_down target {self.pid}", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        returncode = self.process.wait()
        try:
            self.exit = self.harness.recorder.record_exit(self.pid, returncode)
        except (ValueError, OSError):  # the harness was closed first: keep it here only
            self.exit = ProcessExit(self.pid, returncode, time.time())
        finally:
            self._exited.set()

    # -- state --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True until the process has exited."""
        return not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while running."""
        return None if self.exit is None else self.exit.returncode

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr, interleaved)."""
        return self.output_path.read_text(errors="replace")

    def tail(self, lines: int = 20) -> str:
        """The last *lines* lines of its output."""
        return "\n".join(self.output().splitlines()[-lines:])

    def fail(self, message: str) -> TargetError:
        """A :class:`TargetError` for this target, with the tail of its output."""
        return TargetError(f"{message} (pid {self.pid}); its last output:\n{self.tail()}")

    # -- signals ------------------------------------------------------------------------

    def send(self, sig: str | int | signal.Signals) -> SignalSent:
        """Send *sig* to the process now, and record it in the history."""
        number = signal_of(sig)
        if not self.running:
            raise self.fail(f"cannot send {number.name}: the target exited {self.returncode}")
        # Recorded just before sending: the target cannot react before this instant.
        sent = self.harness.recorder.record_signal(self.pid, number.name)
        try:
            os.kill(self.pid, number)
        except ProcessLookupError:
            raise self.fail(f"cannot send {number.name}: the target is gone") from None
        self.signals.append(sent)
        return sent

    def send_after(self, sig: str | int | signal.Signals, seconds: float) -> SignalSent:
        """Wait *seconds* (failing if the target exits meanwhile), then send *sig*."""
        self.sleep(seconds, f"before {signal_of(sig).name}")
        return self.send(sig)

    def sleep(self, seconds: float, why: str = "") -> None:
        """Wait *seconds*; raise :class:`TargetError` if the target exits meanwhile."""
        if self._exited.wait(max(0.0, seconds)):
            raise self.fail(f"the target exited {self.returncode} by itself {why}".rstrip())

    def send_at_random(
        self,
        sig: str | int | signal.Signals,
        low: float,
        high: float,
        rng: random.Random | None = None,
    ) -> SignalSent:
        """Send *sig* at a random instant *low* to *high* seconds from now.

        The instant comes from *rng*, else from the harness's seeded generator.
        """
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got {low}..{high}")
        return self.send_after(sig, (rng or self.harness.rng).uniform(low, high))

    # -- waits --------------------------------------------------------------------------

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its exit code."""
        limit = self.harness.patience if timeout is None else timeout
        if not self._exited.wait(limit):
            raise self.fail(f"the target still runs {limit:g} s later")
        assert self.exit is not None
        return self.exit.returncode

    def wait_output(self, text: str, timeout: float | None = None) -> None:
        """Wait until *text* appears in the output."""
        self._wait_for(lambda: text in self.output() or None, f"{text!r} in its output", timeout)

    def wait_ready(
        self, *, line: str | None = None, url: str | None = None, timeout: float | None = None
    ) -> float:
        """Wait until *line* appears in the output, or *url* answers 200; return the seconds."""
        if line is not None:
            self.wait_output(line, timeout)
        if url is not None:
            self._wait_for(lambda: self._get(url) is not None or None, f"{url} to answer", timeout)
        return time.time() - self.started

    def wait_in_flight(self, count: int = 1, timeout: float | None = None) -> dict[JobId, float]:
        """Wait until at least *count* jobs are in flight; return them (id -> since when)."""

        def enough() -> dict[JobId, float] | None:
            jobs = self.in_flight()
            return jobs if len(jobs) >= count else None

        return self._wait_for(enough, f"{count} jobs in flight", timeout)

    def wait_job_running(self, seconds: float, timeout: float | None = None) -> JobId:
        """Wait until a job has been in flight for *seconds*; return its id."""

        def old_enough() -> list[JobId] | None:
            now = time.time()
            old = [job for job, since in self.in_flight().items() if now - since >= seconds]
            return old or None

        return self._wait_for(old_enough, f"a job running for {seconds:g} s", timeout)[0]

    def wait_done(self, jobs: Iterable[JobId], timeout: float | None = None) -> None:
        """Wait until every one of *jobs* was acked or dead-lettered (by any process)."""
        waiting = set(jobs)

        def done() -> bool | None:
            settled = {e.job for e in self.harness.history().events if e.event in ("ack", "dead")}
            waiting.difference_update(settled)
            return True if not waiting else None

        shown = ", ".join(str(job) for job in sorted(waiting, key=job_order)[:10])
        self._wait_for(done, f"ack or dead-letter of jobs {shown}", timeout)

    def wait_draining(self, timeout: float | None = None) -> None:
        """Wait until the target is draining (its snapshot says so, or it logged the drain)."""
        if self.snapshot_url is not None:
            self._wait_for(
                lambda: bool((self.snapshot() or {}).get("draining")) or None, "a drain", timeout
            )
        else:
            self.wait_output(DRAIN_LINE, timeout)

    def in_flight(self) -> dict[JobId, float]:
        """The jobs in flight now (id -> since when, ``time.time()``).

        From the dashboard's snapshot if the target was started with a
        *snapshot_url*, else from the history (claimed and not yet settled).
        """
        if self.snapshot_url is not None:
            snapshot = self.snapshot()
            now = time.time()
            if snapshot is None:
                return {}
            return {
                job["key"]: now - float(job["age"])
                for service in snapshot["services"]
                for job in service.get("jobs", [])
            }
        return self.harness.history().in_flight(self.pid)

    def snapshot(self) -> dict[str, Any] | None:
        """The target's ``/api/snapshot`` JSON, or None if it does not answer (yet)."""
        if self.snapshot_url is None:
            raise ValueError("this target was started without a snapshot_url")
        body = self._get(self.snapshot_url)
        return None if body is None else dict(json.loads(body))

    # -- stopping -----------------------------------------------------------------------

    def stop(self, grace: float = 10.0) -> int:
        """Stop it if it still runs: SIGTERM, then SIGKILL after *grace* seconds.

        Any process it left behind in its process group is killed too. Returns the
        exit code.
        """
        if self.running:
            with contextlib.suppress(TargetError):  # it may exit in the meantime
                self.send(signal.SIGTERM)
            if not self._exited.wait(grace) and self.running:
                with contextlib.suppress(TargetError):
                    self.send(signal.SIGKILL)
        code = self.wait_exit(self.harness.patience)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left
            os.killpg(self.pid, signal.SIGKILL)
        self._watcher.join(self.harness.patience)
        return code

    # -- internals ----------------------------------------------------------------------

    def _wait_for(self, condition: Callable[[], T | None], what: str, timeout: float | None) -> T:
        limit = self.harness.patience if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            result = condition()
            if result is not None:
                return result
            if not self.running:
                raise self.fail(f"the target exited {self.returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                raise self.fail(f"no {what} after {limit:g} s")
            time.sleep(POLL_INTERVAL)

    def _get(self, url: str) -> bytes | None:
        import urllib.error  # only targets with a dashboard need it
        import urllib.request

        request = urllib.request.Request(url)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=2.0) as response:
                body: bytes = response.read()
                return body if response.status == 200 else None
        except (urllib.error.URLError, OSError, ValueError):
            return None


class ChaosHarness(ClosesOnExit):
    """Run target programs in a folder of their own, signal them, and check their history.

    ::

        with ChaosHarness(tmp_path, env={"QUEUE_JOB_SECONDS": "0.1"}) as chaos:
            target = chaos.start("myapp/worker.py:sup")
            target.wait_in_flight(3)
            target.send("TERM")
            assert target.wait_exit() == 0
            report = chaos.check()
            assert report.ok, report.describe()

    Every target gets, in its environment, the path of the history file the
    harness owns (``NURSERY_DOWN_HISTORY``, for :class:`RecordingSource`) and the
    path of a queue file (in *queue_env*, default ``QUEUE_PATH``) for a target that
    keeps its jobs in an :class:`~nursery_down.queues.SQLiteQueue`. :meth:`history`
    reads both.

    *seed* seeds :attr:`rng`, which random instants come from (random if None;
    :attr:`seed` tells it). *patience* bounds every wait that is given no timeout.
    Leaving the block (or :meth:`close`) stops every target still running and kills
    whatever they left behind.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        queue_env: str | None = "QUEUE_PATH",
        queue_path: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        patience: float = 30.0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.queue_env = queue_env
        self.queue_path = Path(queue_path) if queue_path else self.directory / "queue.sqlite3"
        self.history_path = self.directory / "history.jsonl"
        self.seed = random.randrange(2**32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.patience = patience
        self.recorder = HistoryRecorder(self.history_path)
        self.targets: list[Target] = []

    def start(
        self,
        target: str | Sequence[str],
        *args: str,
        env: Mapping[str, str] | None = None,
        ready_line: str | None = None,
        ready_url: str | None = None,
        snapshot_url: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Target:
        """Start *target* and wait until it is ready; return it.

        *target* is ``"MODULE:ATTR"`` or ``"path/to/file.py:ATTR"`` (run as
        ``python -m nursery_down run TARGET --no-dashboard``, *args* appended;
        ``--no-dashboard`` is left out when *args* name a ``--dashboard``), or a
        whole command line as a list (``[sys.executable, "my_service.py"]``).

        Ready means: *ready_line* appeared in its output and *ready_url* answered
        200, whichever are given. For ``nursery-down run`` targets, when neither is
        given, the line it logs once every service started. *snapshot_url*
        (``http://HOST:PORT/api/snapshot``) lets the named moments read the
        dashboard instead of the history.
        """
        if isinstance(target, str):
            argv = [sys.executable, "-m", "nursery_down", "run", target, *args]
            if not any(arg.startswith("--dashboard") for arg in args):
                argv.append("--no-dashboard")
            if ready_line is None and ready_url is None:
                ready_line = READY_LINE
        else:
            argv = [*target, *args]
        full_env = dict(os.environ)
        full_env.update(self.env)
        full_env.update(env or {})
        full_env[HISTORY_ENV] = str(self.history_path)
        if self.queue_env:
            full_env[self.queue_env] = str(self.queue_path)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        output = self.directory / f"output-{len(self.targets)}.log"
        started = Target(self, argv, full_env, output, snapshot_url)
        self.targets.append(started)
        if wait and (ready_line is not None or ready_url is not None):
            try:
                started.wait_ready(line=ready_line, url=ready_url, timeout=timeout)
            except TargetError:
                started.stop(grace=1.0)
                raise
        return started

    def history(self) -> History:
        """What the targets and the harness recorded so far (see :func:`read_history`)."""
        return read_history(self.history_path, self.queue_path)

    def check(self, *, signal_latency: float = 0.0) -> CheckReport:
        """:func:`check_history` of :meth:`history`; call it once every target has exited."""
        return check_history(self.history(), signal_latency=signal_latency)

    def close(self) -> None:
        """Stop every target still running and kill whatever they left behind."""
        try:
            for target in self.targets:
                target.stop(grace=5.0)
        finally:
            self.recorder.close()
