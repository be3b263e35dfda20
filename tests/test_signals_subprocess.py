"""Real processes, real signals: `nursery-down run` on a program with 20 busy workers.

Each test starts ``tests/programs/ledger_workers.py`` through the command line,
waits for its ledger to show the state it needs, sends signals with ``os.kill`` and
then reads the ledger, the exit code and the final snapshot. Both processes stamp
times with ``time.time()``, so ledger times compare directly with signal times.

The instants of the SIGTERM/SIGINT tests are random; set ``NURSERY_DOWN_SIGNAL_SEED``
to replay the seed a failure reports.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.subprocess

PROGRAM = Path(__file__).resolve().parent / "programs" / "ledger_workers.py"
WORKERS = 20
BASE_SEED = int(os.environ.get("NURSERY_DOWN_SIGNAL_SEED") or random.randrange(2**32))
#: How late a job may start after the program took the signal that drains its service
#: (the instant of its "received SIG..." log line, to the millisecond): a key handed
#: over in that very instant still starts its job, a moment later.
START_TOLERANCE = 0.05
#: Seconds a program may take to exit beyond what its drain has to wait for: process
#: teardown on a busy machine. Small next to what a drain that waits for the wrong
#: thing would take (a 30 s grace, or jobs of 10 s).
EXIT_MARGIN = 2.0
#: Long jobs for the tests that cut them: no job can end by itself during the test.
LONG_JOB = {"job_min": 10.0, "job_max": 12.0}
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ nursery_down: (.*)$", re.M)
#: Every wait for the program has this bound, so a hang fails instead of stalling.
PATIENCE = 15.0


@dataclass
class Ledger:
    """What the program wrote: job starts (time, planned seconds), ends, and services up."""

    starts: dict[str, tuple[float, float]] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    cut: dict[str, float] = field(default_factory=dict)
    up: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Ledger:
        ledger = cls()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return ledger
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 3:  # a line still being written
                continue
            kind, name, stamp = fields[0], fields[1], float(fields[2])
            if kind == "start":
                ledger.starts[name] = (stamp, float(fields[3]))
            elif kind == "done":
                ledger.done[name] = stamp
            elif kind == "cut":
                ledger.cut[name] = stamp
            elif kind == "up":
                ledger.up.append((name, stamp))
        return ledger

    def up_after(self, service: str, moment: float) -> float | None:
        """When *service* was last ready, if that was after *moment*."""
        times = [stamp for name, stamp in self.up if name == service and stamp > moment]
        return max(times) if times else None

    def in_flight_at(self, moment: float) -> list[str]:
        return [
            key
            for key, (started, _) in self.starts.items()
            if started <= moment and self.done.get(key, self.cut.get(key, float("inf"))) > moment
        ]


class Program:
    """One run of the ledger program under ``nursery-down run``."""

    def __init__(self, directory: Path, label: str, **settings: object) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.ledger_path = directory / "ledger"
        self.snapshot_path = directory / "snapshot.json"
        self.output_path = directory / "output"
        env = dict(os.environ)
        env.update(
            {
                "LEDGER_PATH": str(self.ledger_path),
                "LEDGER_SNAPSHOT": str(self.snapshot_path),
                "LEDGER_WORKERS": str(WORKERS),
                **{f"LEDGER_{name.upper()}": str(value) for name, value in settings.items()},
            }
        )
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nursery_down", "run", f"{PROGRAM}:sup"],
                env=env,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.exit_time: float | None = None

    def ledger(self) -> Ledger:
        return Ledger.read(self.ledger_path)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = json.loads(self.snapshot_path.read_text())
        return snapshot

    def service(self, name: str) -> dict[str, Any]:
        for service in self.snapshot()["services"]:
            if service["name"] == name:
                return dict(service)
        raise AssertionError(f"{self.label}: no service {name!r} in the final snapshot")

    def wait_until(
        self, what: str, condition: Callable[[Ledger], bool], patience: float = PATIENCE
    ) -> Ledger:
        """Poll the ledger until *condition* holds; fail if the program exits or stalls."""
        deadline = time.monotonic() + patience
        while True:
            ledger = self.ledger()
            if condition(ledger):
                return ledger
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.label}: exited with {self.process.returncode} while waiting for "
                    f"{what}; output:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label}: no {what} within {patience} s")
            time.sleep(0.005)

    def logged_at(self, message: str) -> float:
        """The ``time.time()`` (to the millisecond, rounded down) of the first log line
        with *message*."""
        for match in LOG_LINE.finditer(self.output()):
            if match.group(3) == message:
                seconds = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
                return seconds + int(match.group(2)) / 1000
        raise AssertionError(f"{self.label}: never logged {message!r}:\n{self.output()}")

    def wait_output(self, text: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.label}: never printed {text!r}:\n{self.output()}")
            time.sleep(0.005)

    def wait_ready(self) -> Ledger:
        return self.wait_until(
            "ready services", lambda ledger: ledger.up_after("feed", 0) is not None
        )

    def send(self, signum: signal.Signals) -> float:
        """Send *signum*; return the time just before it was sent."""
        assert self.process.poll() is None, f"{self.label}: exited before {signum.name}"
        moment = time.time()
        os.kill(self.process.pid, signum)
        return moment

    def wait_exit(self) -> int:
        """Wait for the exit (polling finely, to time it) and return the exit code."""
        deadline = time.monotonic() + PATIENCE
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label}: still running {PATIENCE} s later")
            time.sleep(0.002)
        self.exit_time = time.time()
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=PATIENCE)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Program]]:
    """Start ledger programs; any still running at the end of the test is killed."""
    programs: list[Program] = []

    def start(label: str, **settings: object) -> Program:
        program = Program(tmp_path / f"run-{len(programs)}", label, **settings)
        programs.append(program)
        return program

    try:
        yield start
    finally:
        for program in programs:
            program.stop()


def check_clean_drain(program: Program, signum: signal.Signals, seed: int) -> None:
    """Signal at a random instant; the drain must finish every job and exit 0 in time."""
    rng = random.Random(seed)
    program.wait_ready()
    program.wait_until("a job started", lambda ledger: bool(ledger.starts))
    time.sleep(rng.uniform(0.05, 1.5))  # placing the signal at a random instant of the work
    sent = program.send(signum)
    code = program.wait_exit()
    assert program.exit_time is not None
    ledger = program.ledger()
    label = f"{program.label} (seed {seed}, replay with NURSERY_DOWN_SIGNAL_SEED)"
    assert code == 0, f"{label}: exit code {code}; output:\n{program.output()}"
    assert ledger.starts, f"{label}: no job ever started"
    unfinished = sorted(set(ledger.starts) - set(ledger.done))
    assert not unfinished, f"{label}: started but never finished: {unfinished}"
    assert not ledger.cut, f"{label}: hard-cancelled: {sorted(ledger.cut)}"
    # Measured from the program's own instant, not from the send: how long the kernel
    # and a busy machine take to deliver the signal is not the program's doing.
    received = program.logged_at(f"received {signum.name}")
    late = {key: round(start - received, 3) for key, (start, _) in ledger.starts.items()}
    late = {key: delay for key, delay in late.items() if delay > START_TOLERANCE + 0.001}
    assert not late, f"{label}: jobs started this many seconds after {signum.name}: {late}"
    remaining = max(0.0, *(start + planned - sent for start, planned in ledger.starts.values()))
    took = program.exit_time - sent
    assert took <= remaining + EXIT_MARGIN, (
        f"{label}: exited {took:.3f} s after {signum.name}; longest remaining job {remaining:.3f} s"
    )
    workers = program.service("workers")
    assert workers["completed"] == len(ledger.done), f"{label}: {workers}"
    assert workers["hard_cancelled"] == 0, f"{label}: {workers}"


#: Where the program's workers run: in a nursery of the service's own, or in
#: ctx.run_workers (whose jobs are shielded by their worker's scope).
PLACEMENTS = ["tasks", "run_workers"]


def alternate(run: int) -> str:
    """The placement of the *run*-th of several runs: each in turn."""
    return PLACEMENTS[run % len(PLACEMENTS)]


@pytest.mark.parametrize("run", range(12))
def test_sigterm_mid_job_finishes_every_job_and_exits_0(
    launch: Callable[..., Program], run: int
) -> None:
    seed = BASE_SEED + run
    program = launch(f"SIGTERM run {run}", seed=seed, placement=alternate(run))
    check_clean_drain(program, signal.SIGTERM, seed)
    assert "Traceback" not in program.output(), program.output()


@pytest.mark.parametrize("run", range(3))
def test_sigint_mid_job_drains_like_sigterm_without_keyboard_interrupt(
    launch: Callable[..., Program], run: int
) -> None:
    seed = BASE_SEED + 100 + run
    program = launch(f"SIGINT run {run}", seed=seed, placement=alternate(run))
    check_clean_drain(program, signal.SIGINT, seed)
    output = program.output()
    assert "KeyboardInterrupt" not in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_grace_overrun_hard_cancels_jobs_at_the_deadline_and_exits_3(
    launch: Callable[..., Program], placement: str
) -> None:
    grace = 0.5
    program = launch("grace overrun", grace=grace, **LONG_JOB, seed=BASE_SEED, placement=placement)
    program.wait_until("every worker busy", lambda ledger: len(ledger.starts) >= WORKERS)
    sent = program.send(signal.SIGTERM)
    code = program.wait_exit()
    assert program.exit_time is not None
    assert code == 3, program.output()
    took = program.exit_time - sent
    # Not before the grace deadline (a lower bound no machine is too fast for), and
    # soon after it: far from the 10 s the jobs would have taken.
    assert grace - 0.01 <= took <= grace + EXIT_MARGIN, (
        f"exited {took:.3f} s after SIGTERM with grace {grace} s"
    )
    ledger = program.ledger()
    assert not ledger.done
    assert set(ledger.cut) == set(ledger.starts)
    assert len(ledger.cut) == WORKERS
    workers = program.service("workers")
    assert (workers["hard_cancelled"], workers["completed"], workers["in_flight"]) == (
        WORKERS,
        0,
        0,
    )
    assert program.snapshot()["exit_code"] == 3


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_second_sigterm_during_drain_escalates_and_exits_3(
    launch: Callable[..., Program], placement: str
) -> None:
    program = launch("second SIGTERM", **LONG_JOB, seed=BASE_SEED, placement=placement)
    program.wait_until("every worker busy", lambda ledger: len(ledger.starts) >= WORKERS)
    program.send(signal.SIGTERM)
    program.wait_output("service workers: running -> draining")
    second = program.send(signal.SIGTERM)
    code = program.wait_exit()
    assert program.exit_time is not None
    assert code == 3, program.output()
    took = program.exit_time - second
    # Hard-cancelled at once: far from the 10 s the jobs would have taken.
    assert took <= EXIT_MARGIN, f"exited {took:.3f} s after the second SIGTERM"
    ledger = program.ledger()
    unfinished = set(ledger.starts) - set(ledger.done)
    assert unfinished == set(ledger.cut)
    assert program.service("workers")["hard_cancelled"] == len(ledger.cut) >= WORKERS


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sighup_restarts_every_service_and_keeps_processing(
    launch: Callable[..., Program], placement: str
) -> None:
    program = launch("SIGHUP", seed=BASE_SEED, placement=placement)
    program.wait_until("every worker busy", lambda ledger: len(ledger.starts) >= WORKERS)
    hup = program.send(signal.SIGHUP)

    def restarted_and_working(ledger: Ledger) -> bool:
        workers_up, feed_up = ledger.up_after("workers", hup), ledger.up_after("feed", hup)
        if workers_up is None or feed_up is None:
            return False
        restarted = max(workers_up, feed_up)
        return any(start > restarted for start, _ in ledger.starts.values())

    # Draining the workers takes at most one job (1.2 s); both restarts are quick.
    program.wait_until("new jobs after both services restarted", restarted_and_working)
    assert program.process.poll() is None, "the process must stay up after SIGHUP"
    program.send(signal.SIGTERM)
    code = program.wait_exit()
    assert code == 0, program.output()
    ledger = program.ledger()
    assert set(ledger.starts) == set(ledger.done)
    assert not ledger.cut
    assert {name: program.service(name)["restarts"] for name in ("workers", "feed")} == {
        "workers": 1,
        "feed": 1,
    }


def test_idle_program_exits_promptly_on_sigterm(launch: Callable[..., Program]) -> None:
    program = launch("idle", max_jobs=0)
    program.wait_ready()
    sent = program.send(signal.SIGTERM)
    code = program.wait_exit()
    assert program.exit_time is not None
    assert code == 0, program.output()
    took = program.exit_time - sent
    # Nothing to wait for: far from the 30 s grace.
    assert took <= EXIT_MARGIN, f"an idle program took {took:.3f} s to exit after SIGTERM"
    assert not program.ledger().starts


def test_signals_while_the_interpreter_exits_do_not_change_the_exit_code(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "exiting"
    env = {**os.environ, "SLOW_EXIT_MARKER": str(marker)}
    target = f"{PROGRAM.parent / 'slow_exit.py'}:sup"
    output = tmp_path / "output"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "nursery_down", "run", target, "--no-dashboard"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + PATIENCE

        def still_running() -> None:
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()

        while "every service started" not in output.read_text(errors="replace"):
            still_running()
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGTERM)
        while not marker.exists():  # the run returned; the interpreter is shutting down
            still_running()
            time.sleep(0.005)
        for late in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(process.pid, late)
        code = process.wait(timeout=PATIENCE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.read_text(errors="replace")
    assert code == 0, text
    assert "Traceback" not in text
