"""The chaos harness on real processes: named moments, cleanup, and a checker that can fail.

Targets: ``examples/queue_worker.py`` (an SQLiteQueue, so the queue keeps the
history) scaled down to fast jobs, and ``tests/programs/chaos_memory.py`` (a
MemoryQueue behind a RecordingSource). The README example is run as its own pytest
session, exactly as a user would copy it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nursery_down.testing import ChaosHarness, TargetError
from tests.polling import wait_for

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parent.parent
WORKER = f"{ROOT / 'examples' / 'queue_worker.py'}:sup"
MEMORY_WORKER = f"{ROOT / 'tests' / 'programs' / 'chaos_memory.py'}:sup"
LEFTOVER = ROOT / "tests" / "programs" / "chaos_leftover.py"
FAST = {
    "QUEUE_RATE": "20",
    "QUEUE_JOB_SECONDS": "0.2",
    "QUEUE_WORKERS": "8",
    "QUEUE_DASHBOARD": "off",
}
#: Bound on every wait: generous, for a busy 2-core machine.
PATIENCE = 30.0


@pytest.fixture
def chaos(tmp_path: Path) -> Iterator[ChaosHarness]:
    with ChaosHarness(tmp_path / "chaos", env=FAST, patience=PATIENCE) as harness:
        yield harness


def test_an_in_memory_queue_under_sigkill_is_reported_lost(chaos: ChaosHarness) -> None:
    target = chaos.start(MEMORY_WORKER)
    # Some jobs finished (acked, in the history) before the kill.
    wait_for(
        lambda: any(event.event == "ack" for event in chaos.history().events),
        PATIENCE,
        "a job acked",
        process=target.process,
    )
    running = target.wait_in_flight(2)
    target.send("KILL")
    assert target.wait_exit() == -signal.SIGKILL
    report = chaos.check()
    # The jobs in flight and the jobs queued died with the process: the checker says so.
    assert not report.ok
    killed = report.in_flight_at_kill[target.pid]
    assert killed  # the kill hit jobs in flight...
    assert killed <= set(report.lost)  # ...and the checker reports each of them lost
    # A job seen in flight before the kill either finished in time or was lost with it.
    assert set(running) <= set(report.lost) | set(report.acked)
    assert report.pending == set()
    assert report.acked  # some jobs did finish before the kill
    assert f"lost: {min(report.lost)}" in report.describe()


def test_a_drained_in_memory_queue_loses_only_what_was_never_started(
    chaos: ChaosHarness,
) -> None:
    target = chaos.start(MEMORY_WORKER)
    running = target.wait_in_flight(1)
    target.send("TERM")
    assert target.wait_exit() == 0
    report = chaos.check()
    # In flight at the TERM: finished. Still queued in memory at the exit: gone with it.
    assert set(running) <= report.acked
    assert set(report.lost) == report.enqueued - report.acked - report.dead
    assert report.duplicated == ()
    assert report.started_after_signal == ()


def test_sigterm_with_jobs_in_flight_finishes_them(chaos: ChaosHarness) -> None:
    target = chaos.start(WORKER)
    running = target.wait_in_flight(2)
    target.send("TERM")
    assert target.wait_exit() == 0
    report = chaos.check()
    assert report.ok, report.describe()
    assert set(running) <= report.acked
    (stop,) = report.exit_times
    assert (stop.pid, stop.signal, stop.returncode) == (target.pid, "SIGTERM", 0)
    assert 0 < stop.seconds < 5


def test_sigkill_then_restart_runs_again_only_the_killed_jobs(chaos: ChaosHarness) -> None:
    target = chaos.start(WORKER)
    job = target.wait_job_running(0.1)
    target.send("KILL")
    assert target.wait_exit() == -signal.SIGKILL
    killed = chaos.history().in_flight(target.pid)
    assert killed  # the kill hit jobs in flight
    restarted = chaos.start(WORKER)
    restarted.wait_done(killed)
    restarted.send("TERM")
    assert restarted.wait_exit() == 0
    report = chaos.check()
    assert report.ok, report.describe()
    assert report.in_flight_at_kill == {target.pid: set(killed)}
    # The job seen running was cut by the kill, or finished in the instant before it.
    assert job in killed or job in report.acked
    assert {d.job for d in report.duplicated} <= set(killed)
    assert all(d.in_flight_at_kill for d in report.duplicated)


def test_a_second_sigterm_during_the_drain_escalates(chaos: ChaosHarness) -> None:
    target = chaos.start(WORKER, env={"QUEUE_JOB_SECONDS": "5"})
    running = target.wait_in_flight(2)
    target.send("TERM")
    target.wait_draining()
    target.send("TERM")
    assert target.wait_exit() == 3  # hard-cancelled, released
    report = chaos.check()
    assert report.ok, report.describe()
    assert set(running) <= report.pending
    assert report.max_exit_seconds is not None
    assert report.max_exit_seconds < 5


def test_moments_can_read_the_dashboard_snapshot(chaos: ChaosHarness) -> None:
    pytest.importorskip("hypercorn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = chaos.start(
        WORKER,
        "--dashboard",
        f"127.0.0.1:{port}",
        env={"NURSERY_DOWN_TOKEN": "chaos-test-token"},
        ready_url=f"http://127.0.0.1:{port}/readyz",
        snapshot_url=f"http://127.0.0.1:{port}/api/snapshot",
    )
    running = target.wait_in_flight(2)
    assert all(isinstance(job, int) for job in running)
    target.send("TERM")
    target.wait_exit()
    assert target.returncode == 0, target.tail()
    assert chaos.check().ok


def test_random_instants_come_from_the_seed(tmp_path: Path) -> None:
    delays = []
    for attempt in range(2):
        with ChaosHarness(tmp_path / str(attempt), seed=42) as harness:
            delays.append([harness.rng.uniform(0, 1) for _ in range(3)])
            assert harness.seed == 42
    assert delays[0] == delays[1]


def test_stop_kills_what_the_target_left_behind(chaos: ChaosHarness) -> None:
    target = chaos.start([sys.executable, str(LEFTOVER)], ready_line="ready")
    match = re.search(r"child (\d+)", target.output())
    assert match is not None
    child = int(match.group(1))
    started = time.monotonic()
    assert target.stop(grace=0.5) == -signal.SIGKILL  # it ignored the SIGTERM
    assert time.monotonic() - started < 10
    wait_for(lambda: not _alive(child), PATIENCE, f"child {child} to die in the cleanup")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_target_that_exits_before_it_is_ready_fails_clearly(chaos: ChaosHarness) -> None:
    with pytest.raises(TargetError, match=r"exited 3 while waiting for 'never'") as caught:
        chaos.start(
            [sys.executable, "-c", "print('starting'); raise SystemExit(3)"], ready_line="never"
        )
    assert "starting" in str(caught.value)  # the tail of its output


def test_a_wait_that_never_comes_times_out(chaos: ChaosHarness) -> None:
    target = chaos.start([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(TargetError, match=r"no 'nothing' in its output after 0.2 s"):
        target.wait_output("nothing", timeout=0.2)
    with pytest.raises(ValueError, match="unknown signal"):
        target.send("NOPE")


# -- the README example, run as a user would ------------------------------------------------


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    text = text[text.index("## Chaos-test your own service") :]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    (example,) = [block for block in blocks if "def test_" in block]
    return str(example)


def _plugin_installed() -> bool:
    return any(
        entry.value == "nursery_down.testing._plugin"
        for entry in importlib.metadata.entry_points(group="pytest11")
    )


def test_the_readme_example_passes(tmp_path: Path) -> None:
    example = tmp_path / "test_chaos_example.py"
    example.write_text(_readme_example())
    command = [sys.executable, "-m", "pytest", str(example), "-q", "-p", "no:cacheprovider"]
    command += ["-W", "error", "--rootdir", str(tmp_path)]
    if not _plugin_installed():
        command += ["-p", "nursery_down.testing._plugin"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "5 passed" in done.stdout


def test_the_plugin_is_inactive_until_its_fixture_is_used() -> None:
    code = (
        "import sys, pytest, nursery_down.testing._plugin as p; "
        "hooks = [n for n in vars(p) if n.startswith('pytest_')]; "
        "heavy = [m for m in ('quart', 'hypercorn', 'httpx') if m in sys.modules]; "
        "marks = getattr(p.chaos, '_fixture_function_marker', None) or p.chaos; "
        "print(hooks, heavy, getattr(marks, 'autouse', False))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[] [] False"
