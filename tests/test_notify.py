"""The systemd notify protocol, in process: a real unix datagram socket.

The supervisor tests run under ``autojump_clock``: the notifier sends each datagram
synchronously (a non-blocking ``sendto``), so a datagram is queued on the test's
socket before the sending task blocks again, and the mock clock makes every sleep,
grace and watchdog interval exact. Nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down._notify import Notifier, monotonic_usec, status_line, watchdog_interval
from tests.polling import wait_for_line

#: Bound on every test.
LIMIT = 10.0
PROGRAM = Path(__file__).resolve().parent / "programs" / "notify_app.py"


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound socket in the abstract namespace, named in NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"nursery-down-notify-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with sock:
        yield sock


def received(sock: socket.socket) -> list[list[str]]:
    """Every datagram queued on *sock*, each as its lines."""
    messages: list[list[str]] = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return messages
        messages.append(data.decode().split("\n"))


def keys(message: list[str]) -> list[str]:
    return [line.partition("=")[0] for line in message]


def value(message: list[str], key: str) -> str:
    return next(line.partition("=")[2] for line in message if line.partition("=")[0] == key)


def make_supervisor(job_seconds: float = 0.3) -> nd.Supervisor:
    sup = nd.Supervisor("notified", grace=5.0)

    @sup.service
    async def store(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    @sup.service
    async def work(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("long"):
            await trio.sleep(job_seconds)
        await ctx.wait_draining()

    return sup


# -- the sender -----------------------------------------------------------------------


def test_notifier_sends_one_datagram_to_a_path(tmp_path: Path) -> None:
    path = tmp_path / "n"
    if len(str(path)) > 100:
        pytest.skip("temporary path too long for a unix socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(LIMIT)
        with Notifier(str(path)) as notifier:
            assert notifier.send("READY=1", "STATUS=up")
            assert sock.recv(1024) == b"READY=1\nSTATUS=up"


def test_notifier_sends_to_an_abstract_name(manager: socket.socket) -> None:
    with Notifier(os.environ["NOTIFY_SOCKET"]) as notifier:
        assert notifier.send("WATCHDOG=1")
    assert received(manager) == [["WATCHDOG=1"]]


def test_send_failures_are_logged_once_and_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nursery_down"):
        with Notifier(str(tmp_path / "nobody-listens")) as notifier:
            assert not notifier.send("READY=1")
            assert not notifier.send("STATUS=still nobody")
        with Notifier("relative/path") as odd:
            assert not odd.send("READY=1")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "cannot notify the service manager at NOTIFY_SOCKET=" in messages[0]
    assert "later failures are not logged" in messages[0]
    assert "unsupported address 'relative/path'" in messages[1]


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    with caplog.at_level(logging.WARNING, logger="nursery_down"):
        assert watchdog_interval() is None
    assert "ignoring WATCHDOG_USEC='soon'" in caplog.text


def test_monotonic_usec_is_the_monotonic_clock() -> None:
    before = time.monotonic_ns() // 1000
    usec = monotonic_usec()
    after = time.monotonic_ns() // 1000
    assert before <= usec <= after  # the same clock, read between two readings of it


def test_status_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    def snap(state: str, **extra: object) -> dict[str, object]:
        services = [
            {"state": "running", "in_flight": 3},
            {"state": "draining", "in_flight": 1},
        ]
        return {
            "state": state,
            "services": services,
            "grace_deadline": None,
            "pre_drain_until": None,
            "exit_code": None,
            **extra,
        }

    now = time.time()
    # The notifier's wall clock stands still: "12 s" and "5 s" whatever the machine's speed.
    monkeypatch.setattr("nursery_down._notify.time", SimpleNamespace(time=lambda: now))
    assert status_line(snap("running")) == "running: 1/2 services up, 4 jobs in flight"
    assert status_line(snap("running"), reloading=True) == (
        "restarting every service in turn: 1/2 services up, 4 jobs in flight"
    )
    assert status_line(snap("draining", grace_deadline=now + 12.2)) == (
        "draining: 1/2 services up, 4 jobs in flight, hard-cancel in 12 s"
    )
    assert status_line(snap("draining", pre_drain_until=now + 4.8, grace_deadline=now + 35)) == (
        "draining: still serving for 5 s; 1/2 services up, 4 jobs in flight"
    )
    assert status_line(snap("stopped", exit_code=3)) == "stopped: exit code 3"


# -- serve_notify ---------------------------------------------------------------------


async def test_without_notify_socket_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(nd.serve_notify, make_supervisor())
            # Returned at once: nothing left in the nursery.
            assert not nursery.child_tasks


async def test_messages_through_start_restart_drain_and_stop(
    manager: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    sup = make_supervisor(job_seconds=1.0)
    messages: list[list[str]] = []

    async def wait_for_ready(count: int) -> None:
        while sum(1 for m in messages if "READY" in keys(m)) < count:
            await trio.sleep(0.02)
            messages.extend(received(manager))

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup, notify=True):
            await wait_for_ready(1)
            await sup.restart()
            await wait_for_ready(2)
            await sup.drain()  # the restarted "work" holds a job for a second
            await trio.sleep(0.1)
            await sup.extend_grace(10.0)
    messages.extend(received(manager))
    protocol = [keys(m) for m in messages if set(keys(m)) - {"STATUS"}]
    assert protocol == [
        ["READY", "STATUS"],
        ["RELOADING", "MONOTONIC_USEC", "STATUS"],
        ["READY", "STATUS"],
        ["STOPPING", "STATUS", "EXTEND_TIMEOUT_USEC"],
        ["STATUS", "EXTEND_TIMEOUT_USEC"],
    ], messages
    extends = [
        int(value(m, "EXTEND_TIMEOUT_USEC")) for m in messages if "EXTEND_TIMEOUT_USEC" in keys(m)
    ]
    # 5 s of grace + 2 s of stop margin; then 10 s more, asked 0.1 s (mock clock) later.
    # Exact but for the real time between two wall-clock readings in the notifier,
    # which can only make a value smaller: the lower bounds leave it half a second.
    assert 6_500_000 < extends[0] <= 7_000_000
    assert 16_400_000 < extends[1] <= 16_900_000
    assert value(messages[0], "STATUS").startswith("starting: ")
    assert value(messages[-2], "STATUS").startswith("draining: 0/2 services up, 0 jobs in flight")
    assert value(messages[-1], "STATUS") == "stopped: exit code 0"


async def test_watchdog_pings_at_half_the_interval(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup, notify=True):
            await trio.sleep(0.55)
            await sup.escalate()
    pings = [m for m in received(manager) if m == ["WATCHDOG=1"]]
    assert len(pings) == 6  # at 0, 0.1, 0.2, 0.3, 0.4 and 0.5 s


async def test_watchdog_for_another_process_is_not_pinged(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup, notify=True):
            await trio.sleep(0.3)  # three intervals: a ping would have gone out
            await sup.escalate()
    messages = received(manager)
    assert messages
    assert ["WATCHDOG=1"] not in messages


async def test_open_supervisor_does_not_notify_unless_asked(manager: socket.socket) -> None:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            await sup.escalate()
    assert received(manager) == []


async def test_a_missing_socket_costs_one_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    sup = make_supervisor()
    with trio.fail_after(LIMIT), caplog.at_level(logging.WARNING, logger="nursery_down"):
        async with nd.open_supervisor(sup, notify=True):
            await trio.sleep(0.1)
            await sup.drain()
    assert sup.exit_code == nd.EXIT_OK
    warnings = [r for r in caplog.records if "cannot notify" in r.getMessage()]
    assert len(warnings) == 1


def run_program_until_sigterm(directory: Path, notify: str) -> str:
    """Run ``notify_app.py`` with ``NOTIFY_APP=notify`` until every service
    started, then SIGTERM it; it must exit 0. Its output."""
    log = directory / f"output-{notify}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    env["NOTIFY_APP"] = notify
    with log.open("wb") as output:
        program = subprocess.Popen(
            [sys.executable, str(PROGRAM)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(log, "every service started", LIMIT, process=program)
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=LIMIT) == 0, log.read_text()
    finally:
        if program.poll() is None:
            program.kill()
            program.wait(LIMIT)
    return log.read_text()


@pytest.mark.subprocess
def test_nd_run_with_notify_false_sends_no_datagram(manager: socket.socket, tmp_path: Path) -> None:
    run_program_until_sigterm(tmp_path, "off")
    # Every datagram is sent before the process exits: what it sent is queued by now.
    assert received(manager) == []
    output = run_program_until_sigterm(tmp_path, "default")
    protocol = [keys(message) for message in received(manager)]
    assert ["READY", "STATUS"] in protocol, output
    assert any("STOPPING" in message for message in protocol), output
