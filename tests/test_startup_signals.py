"""Real processes, real signals while a program starts up: no signal is ever lost.

Each test starts ``tests/programs/slow_start.py``, which prints a marker line and
calls ``nd.run(sup, dashboard="127.0.0.1:0")``; its one service takes 0.4 s before
``ctx.ready()``, then runs 0.3 s jobs from an intake; the grace is 5 s. Start-up is
thus: the interpreter and its imports, the marker, ``nd.run`` taking over the
signals, the dashboard (its imports, its socket), the service's own 0.4 s, then work.

SIGTERM goes at 20 instants spread evenly over the first 1.5 s after the spawn, a few
processes at a time. The rule for each run, strict and independent of timing:

- If ``/proc/PID/status`` showed SIGTERM caught just before it was sent, ``nd.run``
  owned it: the process must drain and exit 0, within the grace plus a margin.
- A death by SIGTERM (returncode -15) is the kernel's default action: the signal came
  before ``nd.run`` installed its handlers. That is acceptable only if nothing from
  ``nd.run`` was written (its first output comes after it owns the signals). The
  marker line alone does not count: the signal may fall between the marker and
  ``nd.run``'s first statements.
- Exit 0 must come with the "received SIGTERM" log line and every job started must
  have finished. Any other outcome fails.

SIGINT goes only once ``nd.run`` owns the signals (before that, Python's own SIGINT
handler raises KeyboardInterrupt, as for any Python program): it must drain like
SIGTERM, with no KeyboardInterrupt or traceback. SIGHUP during start-up must leave
the process up and restart every service once start-up is over.

Synchronisation is on observable state only: the kernel's signal dispositions, the
program's log lines and its ledger. Sleeps only place a signal at its instant.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

PROGRAM = Path(__file__).resolve().parent / "programs" / "slow_start.py"
MARKER = "slow_start: calling nd.run"
GRACE = 5.0
#: On top of the grace: the rest of the interpreter's start-up (imports, the dashboard)
#: on a loaded 2-core machine.
MARGIN = 5.0
#: Every wait on a program has this bound, so a hang fails instead of stalling.
PATIENCE = 30.0
#: SIGTERM instants, in seconds after the spawn: 0 to 1.5 s, evenly.
INSTANTS = [round(i * 1.5 / 19, 4) for i in range(20)]
#: Processes run at once (each batch spans the whole range of instants).
BATCHES = 5

STARTING = "app slow-start: starting 1 services"
STARTED = "app slow-start: every service started"
RESTARTING = "app slow-start: restarting every service"
RESTARTED = "app slow-start: every service restarted"
#: Anything nd.run writes: a log record of the "nursery_down" loggers (format
#: "TIME LEVEL NAME: MESSAGE") or the dashboard's URL line.
ND_OUTPUT = re.compile(
    r"^\S+ \S+ (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) nursery_down[\w.]*: "
    r"|^nursery_down dashboard: ",
    re.MULTILINE,
)


@dataclass
class Ledger:
    """What the program wrote: when the service was ready, job starts and ends."""

    up: list[float] = field(default_factory=list)
    starts: dict[int, float] = field(default_factory=dict)
    done: dict[int, float] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Ledger:
        ledger = cls()
        if not path.exists():
            return ledger
        # Only whole lines: the last piece may still be being written.
        for line in path.read_text().split("\n")[:-1]:
            fields = line.split()
            if not fields:
                continue
            if fields[0] == "up":
                ledger.up.append(float(fields[1]))
            elif fields[0] == "start":
                ledger.starts[int(fields[1])] = float(fields[2])
            elif fields[0] == "done":
                ledger.done[int(fields[1])] = float(fields[2])
        return ledger

    def unfinished(self) -> list[int]:
        return sorted(set(self.starts) - set(self.done))


@dataclass(frozen=True)
class Sent:
    """One signal sent: which, when (time.monotonic()) and whether it was caught then."""

    signum: signal.Signals
    at: float
    #: The process had a handler for it installed just before it was sent.
    caught: bool


class Program:
    """One run of slow_start.py, its output (stdout and stderr) in one file."""

    def __init__(self, directory: Path, label: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.output_path = directory / "output"
        self.ledger_path = directory / "ledger"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
        env.update(
            SLOW_START_LEDGER=str(self.ledger_path),
            SLOW_START_GRACE=str(GRACE),
            NURSERY_DOWN_TOKEN="startup-signals-test-token",
        )
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        with self.output_path.open("wb") as output:
            # Popen returns once the child has exec'd: from here on /proc shows the
            # new interpreter's signal dispositions, not the test's.
            self.process = subprocess.Popen(
                [sys.executable, str(PROGRAM)],
                env=env,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.spawned = time.monotonic()
        self.exited: float | None = None
        self.sent: list[Sent] = []

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def ledger(self) -> Ledger:
        return Ledger.read(self.ledger_path)

    def describe(self) -> str:
        return f"{self.label} (pid {self.process.pid}); output:\n{self.output()[-4000:]}"

    def catches(self, signum: signal.Signals) -> bool:
        """Whether the process has a handler installed for *signum* now (from /proc)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except FileNotFoundError:  # already reaped
            return False
        match = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
        assert match is not None, status
        return bool(int(match.group(1), 16) >> (signum - 1) & 1)

    def send(self, signum: signal.Signals) -> Sent:
        assert self.process.poll() is None, f"exited before {signum.name}: {self.describe()}"
        caught = self.catches(signum)
        sent = Sent(signum, time.monotonic(), caught)
        os.kill(self.process.pid, signum)
        self.sent.append(sent)
        return sent

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and self.exited is None:
            self.exited = time.monotonic()
        return code

    def wait_exit(self) -> int:
        deadline = time.monotonic() + PATIENCE
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running {PATIENCE} s later: {self.describe()}")
            time.sleep(0.005)
        return code

    def wait_until(self, what: str, condition: Callable[[], bool]) -> None:
        """Poll until *condition* holds; fail if the program exits first or stalls."""
        deadline = time.monotonic() + PATIENCE
        while not condition():
            if self.poll() is not None:
                raise AssertionError(f"exited while waiting for {what}: {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {PATIENCE} s: {self.describe()}")
            time.sleep(0.005)

    def wait_output(self, text: str) -> None:
        self.wait_until(repr(text), lambda: text in self.output())

    def wait_signals_owned(self) -> None:
        """Wait until nd.run owns SIGTERM, SIGINT and SIGHUP (Python itself catches
        only SIGINT; SIGTERM and SIGHUP are caught once nd.run took all three)."""
        self.wait_until(
            "handlers for SIGTERM and SIGHUP",
            lambda: self.catches(signal.SIGTERM) and self.catches(signal.SIGHUP),
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(PATIENCE)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[[str], Program]]:
    """Start programs; any still running at the end of the test is killed."""
    programs: list[Program] = []

    def start(label: str) -> Program:
        program = Program(tmp_path / f"run-{len(programs)}", label)
        programs.append(program)
        return program

    try:
        yield start
    finally:
        for program in programs:
            program.stop()


def drained_cleanly(program: Program, sent: Sent) -> list[str]:
    """What is wrong with a run that should have drained on *sent* and exited 0."""
    problems = []
    output = program.output()
    code = program.process.returncode
    if code != 0:
        problems.append(f"exit code {code}")
    if MARKER not in output:
        problems.append("no marker line: the program never reached nd.run")
    if f"received {sent.signum.name}" not in output:
        problems.append(f"no 'received {sent.signum.name}' line")
    for bad in ("Traceback", "KeyboardInterrupt"):
        if bad in output:
            problems.append(f"{bad} in the output")
    assert program.exited is not None
    took = program.exited - sent.at
    if took > GRACE + MARGIN:
        problems.append(f"exited {took:.2f} s after {sent.signum.name}")
    unfinished = program.ledger().unfinished()
    if unfinished:
        problems.append(f"jobs started but never finished: {unfinished}")
    return problems


def judge_sigterm(program: Program) -> list[str]:
    """The rule of the module docstring, for a run that got one SIGTERM."""
    (sent,) = program.sent
    code = program.process.returncode
    output = program.output()
    if code == -signal.SIGTERM:
        problems = []
        if sent.caught:
            problems.append("killed by SIGTERM although a handler was installed before it")
        written = ND_OUTPUT.search(output)
        if written:
            problems.append(
                f"killed by SIGTERM after nd.run took over (it wrote {written.group(0)!r})"
            )
        return problems
    return drained_cleanly(program, sent)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_sigterm_at_any_instant_of_start_up_is_never_lost(
    launch: Callable[[str], Program], batch: int
) -> None:
    # Each batch takes every BATCHES-th instant: its processes are signalled at
    # instants spread over the whole range, so they do not all start up at once.
    instants = INSTANTS[batch::BATCHES]
    programs = [launch(f"SIGTERM {instant:.3f} s after the spawn") for instant in instants]
    plan = sorted(
        (
            (program.spawned + instant, program)
            for program, instant in zip(programs, instants, strict=True)
        ),
        key=lambda item: item[0],
    )
    for moment, program in plan:
        # Placing the signal (not waiting for anything), and timing exits meanwhile.
        while time.monotonic() < moment:
            for other in programs:
                other.poll()
            time.sleep(min(0.002, max(0.0, moment - time.monotonic())))
        program.send(signal.SIGTERM)
    deadline = time.monotonic() + PATIENCE
    while any(program.poll() is None for program in programs):
        if time.monotonic() > deadline:
            running = [program.describe() for program in programs if program.poll() is None]
            raise AssertionError(f"still running {PATIENCE} s after SIGTERM: {running}")
        time.sleep(0.005)
    failures = {program.describe(): judge_sigterm(program) for program in programs}
    failures = {run: problems for run, problems in failures.items() if problems}
    assert not failures, "\n\n".join(f"{problems} in {run}" for run, problems in failures.items())


#: Where SIGINT goes: (what to wait for, then how long after it).
SIGINT_MOMENTS = [
    ("signals owned", 0.0),  # nd.run owns the signals; the dashboard is still starting
    (STARTING, 0.0),  # the service's 0.4 s before ready() has just begun
    (STARTING, 0.25),  # in the middle of it
    (STARTED, 0.15),  # jobs in flight
]


@pytest.mark.parametrize(("moment", "delay"), SIGINT_MOMENTS)
def test_sigint_during_start_up_drains_without_keyboard_interrupt(
    launch: Callable[[str], Program], moment: str, delay: float
) -> None:
    program = launch(f"SIGINT {delay} s after {moment!r}")
    if moment == "signals owned":
        program.wait_signals_owned()
    else:
        program.wait_output(moment)
    time.sleep(delay)  # placing the signal, not waiting
    sent = program.send(signal.SIGINT)
    program.wait_exit()
    problems = drained_cleanly(program, sent)
    assert not problems, f"{problems} in {program.describe()}"


@pytest.mark.parametrize("moment", ["signals owned", STARTING])
def test_sighup_during_start_up_restarts_every_service_once_start_up_ends(
    launch: Callable[[str], Program], moment: str
) -> None:
    program = launch(f"SIGHUP at {moment!r}")
    if moment == "signals owned":
        program.wait_signals_owned()
    else:
        program.wait_output(moment)
    hup = program.send(signal.SIGHUP)
    assert hup.caught, program.describe()
    program.wait_output(RESTARTED)

    def working_after_restart() -> bool:
        ledger = program.ledger()
        return len(ledger.up) == 2 and any(start > ledger.up[1] for start in ledger.starts.values())

    program.wait_until("a job after the restart", working_after_restart)
    assert program.poll() is None, f"the process must stay up: {program.describe()}"
    output = program.output()
    assert "received SIGHUP" in output, program.describe()
    # Deferred: the restart began only once start-up was over, and only once.
    assert output.index(STARTED) < output.index(RESTARTING), program.describe()
    assert output.count(RESTARTING) == 1, program.describe()
    assert output.count(RESTARTED) == 1, program.describe()
    assert len(program.ledger().up) == 2, program.describe()

    term = program.send(signal.SIGTERM)
    assert term.caught, program.describe()
    program.wait_exit()
    problems = drained_cleanly(program, term)
    assert not problems, f"{problems} in {program.describe()}"
    assert program.ledger().starts, program.describe()
