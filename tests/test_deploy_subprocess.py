"""Real processes under a stand-in service manager: `nursery-down run` with a NOTIFY_SOCKET.

The test binds a unix datagram socket, as systemd does for a ``Type=notify`` unit,
starts ``tests/programs/notify_target.py`` with ``NOTIFY_SOCKET`` pointing at it,
reads every datagram in a thread (stamped on arrival) and sends real signals.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.dashboard_helpers import URL_LINE, http, wait_for

pytestmark = pytest.mark.subprocess

HERE = Path(__file__).resolve().parent
TARGET = f"{HERE / 'programs' / 'notify_target.py'}:sup"
ONESHOT = f"{HERE / 'programs' / 'oneshot.py'}:sup"
TOKEN = "deploy-test-token-6b1e"
#: The pre-drain delay of the readiness test: room enough for its two requests in it.
PRE_DRAIN = 3.0
#: Every wait on the program is bounded by this, so a hang fails instead of stalling.
PATIENCE = 30.0
RUNNING = r"running: 2/2 services up, [0-2] jobs? in flight"
BUSY = r"running: 2/2 services up, [12] jobs? in flight"


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() on arrival
    lines: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(line.partition("=")[0] for line in self.lines)

    def value(self, key: str) -> str | None:
        for line in self.lines:
            name, _, value = line.partition("=")
            if name == key:
                return value
        return None


@dataclass
class ServiceManager:
    """The receiving end of NOTIFY_SOCKET: collects datagrams in a thread."""

    address: str
    sock: socket.socket
    received: list[Datagram] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def read_forever(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            with self.lock:
                self.received.append(Datagram(time.monotonic(), tuple(data.decode().split("\n"))))

    def datagrams(self) -> list[Datagram]:
        with self.lock:
            return list(self.received)

    def protocol(self) -> list[Datagram]:
        """Everything but the watchdog pings and STATUS-only updates."""
        return [d for d in self.datagrams() if set(d.keys) - {"STATUS", "WATCHDOG"}]

    def pings(self) -> list[float]:
        return [d.at for d in self.datagrams() if d.keys == ("WATCHDOG",)]

    def wait(self, what: str, condition: Callable[[list[Datagram]], bool]) -> None:
        wait_for(lambda: condition(self.datagrams()), PATIENCE, what)


@contextmanager
def service_manager(*, abstract: bool) -> Iterator[ServiceManager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    directory = None
    if abstract:
        address = f"@nursery-down-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + address[1:])
    else:
        # Short: unix socket paths are limited to 107 bytes.
        directory = tempfile.mkdtemp(prefix="nd-", dir="/tmp")
        address = f"{directory}/notify"
        sock.bind(address)
    sock.settimeout(0.1)
    manager = ServiceManager(address, sock)
    reader = threading.Thread(target=manager.read_forever, daemon=True)
    reader.start()
    try:
        yield manager
    finally:
        manager.stop.set()
        reader.join(5)
        sock.close()
        if directory is not None:
            Path(address).unlink(missing_ok=True)
            os.rmdir(directory)


@dataclass
class Program:
    process: subprocess.Popen[bytes]
    output_path: Path

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def signal(self, signum: int) -> float:
        """Send *signum*; return when (time.monotonic())."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        return sent

    def wait(self) -> int:
        return self.process.wait(PATIENCE)


@contextmanager
def start(
    tmp_path: Path, manager: ServiceManager, *args: str, target: str = TARGET, **env: str
) -> Iterator[Program]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        environment.pop(name, None)
    environment.update({"NOTIFY_SOCKET": manager.address, **env})
    output = tmp_path / f"output-{time.monotonic_ns()}.txt"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "nursery_down", "run", target, *args],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Program(process, output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(PATIENCE)


def readies(datagrams: list[Datagram]) -> int:
    return sum(1 for d in datagrams if "READY" in d.keys)


def busy_since_ready(datagrams: list[Datagram], ready: int) -> bool:
    """True once a STATUS after the *ready*-th READY=1 reports both services up, jobs in flight."""
    seen = 0
    for datagram in datagrams:
        seen += "READY" in datagram.keys
        if seen >= ready and re.fullmatch(BUSY, datagram.value("STATUS") or ""):
            return True
    return False


def stopped(datagrams: list[Datagram]) -> bool:
    """True once the last datagram of a run, ``STATUS=stopped: ...``, was read."""
    return any((d.value("STATUS") or "").startswith("stopped: ") for d in datagrams)


def test_notify_sequence_through_start_sighup_drain_and_exit(tmp_path: Path) -> None:
    with (
        service_manager(abstract=True) as manager,
        start(tmp_path, manager, WATCHDOG_USEC="1000000") as program,
    ):
        manager.wait("READY=1", lambda got: readies(got) == 1)
        # Running with jobs in flight, and watchdog pings going out, before the SIGHUP.
        manager.wait("a STATUS with jobs in flight", lambda got: busy_since_ready(got, 1))
        manager.wait("four watchdog pings", lambda got: len(manager.pings()) >= 4)
        hup_at = program.signal(signal.SIGHUP)
        manager.wait("READY=1 after the rolling restart", lambda got: readies(got) == 2)
        # Jobs in flight again after the restart, so the drain has some to wait for.
        manager.wait("jobs in flight after the restart", lambda got: busy_since_ready(got, 2))
        term_at = program.signal(signal.SIGTERM)
        code = program.wait()
        # The reader thread takes the datagrams still queued on the socket.
        manager.wait("STATUS=stopped", stopped)
        assert code == 0, program.output()
        protocol = manager.protocol()
        datagrams = manager.datagrams()

    assert [d.keys for d in protocol] == [
        ("READY", "STATUS"),
        ("RELOADING", "MONOTONIC_USEC", "STATUS"),
        ("READY", "STATUS"),
        ("STOPPING", "STATUS", "EXTEND_TIMEOUT_USEC"),
    ], protocol
    ready, reloading, reloaded, stopping = protocol
    assert re.fullmatch(RUNNING, ready.value("STATUS") or "")
    assert reloading.at >= hup_at
    assert re.fullmatch(
        r"restarting every service in turn: [0-2]/2 services up, [0-2] jobs? in flight",
        reloading.value("STATUS") or "",
    )
    monotonic = int(reloading.value("MONOTONIC_USEC") or 0)
    assert abs(monotonic / 1e6 - reloading.at) < 2.0  # the same clock: CLOCK_MONOTONIC
    assert re.fullmatch(RUNNING, reloaded.value("STATUS") or "")
    assert stopping.at >= term_at
    assert re.fullmatch(
        r"draining: [01]/2 services up, [12] jobs? in flight, hard-cancel in (9|10) s",
        stopping.value("STATUS") or "",
    )
    # Up to the 10 s grace plus 1 s of stop margin for each of the two services.
    extend = int(stopping.value("EXTEND_TIMEOUT_USEC") or 0)
    assert 11_000_000 < extend <= 12_000_000

    statuses = [status for d in datagrams if (status := d.value("STATUS")) is not None]
    assert re.fullmatch(r"starting: [0-2]/2 services up, [0-2] jobs? in flight", statuses[0])
    assert statuses[-1] == "stopped: exit code 0"
    assert any(re.fullmatch(r"running: 2/2 services up, [12] jobs? in flight", s) for s in statuses)
    # Not one message per job: jobs of 0.4 s ran for over a second, statuses stayed few.
    assert len(statuses) < 40

    # Every 0.5 s (half of WATCHDOG_USEC). The times are stamped on arrival by the reader
    # thread, which may be late by a moment: the mean gap is 0.5 s whatever the lateness
    # of a single reading, and no single gap comes near the 1 s a missed ping would make.
    pings = manager.pings()
    assert len(pings) >= 4
    assert 0.4 < (pings[-1] - pings[0]) / (len(pings) - 1) < 0.7
    assert all(later - earlier < 1.5 for earlier, later in itertools.pairwise(pings))


def test_a_blocked_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    block_file = tmp_path / "block-now"
    with (
        service_manager(abstract=False) as manager,
        start(
            tmp_path,
            manager,
            WATCHDOG_USEC="200000",  # pings every 0.1 s
            NOTIFY_BLOCK_FILE=str(block_file),
            NOTIFY_BLOCK_SECONDS="2.0",
        ) as program,
    ):
        manager.wait("READY=1", lambda got: readies(got) == 1)
        manager.wait("three watchdog pings", lambda got: len(manager.pings()) >= 3)
        blocked_at = time.monotonic()
        block_file.touch()
        wait_for(lambda: not block_file.exists(), PATIENCE, "the program to take the block file")
        # Pings come back once the loop runs again.
        wait_for(
            lambda: len([t for t in manager.pings() if t > blocked_at + 2.0]) >= 3,
            PATIENCE,
            "pings after the blocking call",
        )
        program.signal(signal.SIGTERM)
        code = program.wait()
        assert code == 0, program.output()
        pings = manager.pings()

    before = [t for t in pings if t < blocked_at]
    assert len(before) >= 3
    gaps = [(later - earlier, earlier) for earlier, later in itertools.pairwise(pings)]
    longest, started = max(gaps)
    # No ping for (nearly) the whole 2 s the loop was blocked, and only then. (Arrival
    # times are stamped by the reader thread: a stamp may be late by a moment.)
    assert longest >= 1.5
    assert blocked_at - 0.5 < started < blocked_at + 1.0
    others = [gap for gap, at in gaps if at != started]
    assert max(others) < 1.0


def test_readyz_is_503_through_the_pre_drain_delay_while_services_keep_serving(
    tmp_path: Path,
) -> None:
    with (
        service_manager(abstract=True) as manager,
        start(
            tmp_path,
            manager,
            "--dashboard",
            "127.0.0.1:0",
            "--pre-drain",
            str(PRE_DRAIN),
            NURSERY_DOWN_TOKEN=TOKEN,
        ) as program,
    ):
        match = wait_for(lambda: URL_LINE.search(program.output()), PATIENCE, "the URL line")
        port = int(match.group(1).rsplit(":", 1)[1])
        manager.wait("READY=1", lambda got: readies(got) == 1)
        assert http(port, "GET", "/readyz")[0] == 200
        term_at = program.signal(signal.SIGTERM)
        manager.wait("STOPPING=1", lambda got: any("STOPPING" in d.keys for d in got))
        status, _, body = http(port, "GET", "/readyz")
        # Asked after /readyz answered: if the delay is still on here, it was then too.
        snapshot_status, _, snapshot_body = http(port, "GET", "/api/snapshot", token=TOKEN)
        code = program.wait()
        exited_at = time.monotonic()
        output = program.output()

    assert snapshot_status == 200
    snapshot = json.loads(snapshot_body)
    # Still in the pre-drain delay when the snapshot was taken (else the test proves
    # nothing): the delay's end is set and both services still serve.
    assert snapshot["pre_drain_until"] is not None, snapshot
    assert snapshot["draining"] is True
    assert [s["state"] for s in snapshot["services"]] == ["running", "running"]
    assert status == 503
    assert '"state":"draining"' in body
    assert code == 0, output
    assert exited_at - term_at >= PRE_DRAIN  # a lower bound: no machine is too fast for it
    assert "pre-drain delay over" in output
    stopping = next(d for d in manager.protocol() if "STOPPING" in d.keys)
    assert (stopping.value("STATUS") or "").startswith("draining: still serving for ")
    # Jobs were in flight through the delay: systemd is asked to wait for delay + grace.
    assert int(stopping.value("EXTEND_TIMEOUT_USEC") or 0) > 12_000_000


def test_budget_warning_names_the_numbers_and_the_fix(tmp_path: Path) -> None:
    with (
        service_manager(abstract=True) as manager,
        start(
            tmp_path, manager, "--grace", "30", "--outer-deadline", "20", target=ONESHOT
        ) as program,
    ):
        code = program.wait()
        output = program.output()
    assert code == 0, output
    warning = next(line for line in output.splitlines() if "grace budget" in line)
    assert " WARNING " in warning
    assert "grace 30 s + stop margin 1 s (1 s for each of 1 service) = 31 s" in warning
    assert "outer deadline of 20 s" in warning
    assert "lower the grace to at most 19 s" in warning
    assert "to at least 31 s" in warning


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["--outer-deadline", "0"],
            {},
            "--outer-deadline: expected a finite number of seconds > 0",
        ),
        (["--pre-drain", "-1"], {}, "--pre-drain: expected a finite number of seconds >= 0"),
        ([], {"NURSERY_DOWN_OUTER_DEADLINE": "30s"}, "NURSERY_DOWN_OUTER_DEADLINE='30s'"),
        ([], {"NURSERY_DOWN_PRE_DRAIN": "-5"}, "NURSERY_DOWN_PRE_DRAIN='-5'"),
    ],
)
def test_bad_deadlines_are_usage_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    with (
        service_manager(abstract=True) as manager,
        start(tmp_path, manager, *args, target=ONESHOT, **env) as program,
    ):
        code = program.wait()
        output = program.output()
    assert code == 2, output
    assert expected in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output
