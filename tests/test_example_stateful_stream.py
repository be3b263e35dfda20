"""examples/stateful_stream.py: a drained instance hands its state and lock to the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.polling import wait_for, wait_for_line

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stateful_stream.py"
WINDOW = 10  # events per checkpoint (STREAM_WINDOW)

pytestmark = pytest.mark.subprocess


@dataclass
class Lock:
    """Which lock the instances use: the lock file (*dsn* None) or a PostgresLock."""

    state_dir: Path
    dsn: str | None = None

    def environment(self) -> dict[str, str]:
        if self.dsn is None:
            return {}
        return {"STREAM_LOCK_DSN": self.dsn, "STREAM_LOCK_LEASE": "1"}

    def holder_pid(self) -> int | None:
        """The pid of the instance holding the lock, None when it is free."""
        if self.dsn is None:
            path = self.state_dir / "processor.lock"
            return int(path.read_text()) if path.exists() else None
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:
            row = connection.execute(
                "SELECT holder FROM nd_locks WHERE name = 'stateful-stream'"
            ).fetchone()
        return None if row is None else int(row[0].rsplit(":", 1)[1])


@pytest.fixture(params=["file", "postgres"])
def lock(request: pytest.FixtureRequest, tmp_path: Path) -> Lock:
    if request.param == "file":
        return Lock(tmp_path)
    return Lock(tmp_path, request.getfixturevalue("postgres_dsn"))


def start(state_dir: Path, log: Path, lock: Lock) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAM_DIR": str(state_dir),
        "STREAM_EVENT_SECONDS": "0.005",
        "STREAM_WINDOW": str(WINDOW),
        **lock.environment(),
    }
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, str(EXAMPLE)], stdout=output, stderr=subprocess.STDOUT, env=env
        )


def checkpointed(state_dir: Path) -> int:
    """The position in the last checkpoint (written atomically), 0 before the first."""
    try:
        return int(json.loads((state_dir / "checkpoint.json").read_text())["position"])
    except FileNotFoundError:
        return 0


def test_a_drained_instance_hands_over_to_a_waiting_one(tmp_path: Path, lock: Lock) -> None:
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(tmp_path, first_log, lock)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for_line(first_log, r"resuming at event 0,")
        second = start(tmp_path, second_log, lock)  # waits for the lock
        # Its service began (and went for the lock); the first goes on processing
        # a few windows meanwhile, and the second still waits.
        wait_for_line(second_log, r"service processor: stopped -> starting", process=second)
        floor = checkpointed(tmp_path) + 3 * WINDOW
        wait_for(
            lambda: checkpointed(tmp_path) >= floor, what=f"a checkpoint at {floor}", process=first
        )
        assert "resuming" not in second_log.read_text()
        assert lock.holder_pid() == first.pid
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        handed = int(wait_for_line(first_log, r"handing over at event (\d+)").group(1))
        assert handed > 0
        assert handed % 10 == 0  # the window in flight finished before the hand-over
        resumed = int(wait_for_line(second_log, r"resuming at event (\d+)").group(1))
        assert resumed == handed
        # The second processes: a checkpoint of its own past the hand-over.
        wait_for(
            lambda: checkpointed(tmp_path) > handed,
            what="a checkpoint of the second",
            process=second,
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        final = json.loads((tmp_path / "checkpoint.json").read_text())
        assert final["position"] > handed
        assert final["total"] == sum(range(final["position"]))  # nothing twice, nothing skipped
        assert lock.holder_pid() is None  # released on the drain
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_a_stale_lock_from_a_killed_instance_is_taken_over(tmp_path: Path, lock: Lock) -> None:
    log = tmp_path / "first.log"
    first = start(tmp_path, log, lock)
    try:
        wait_for_line(log, r"resuming at event 0,")
        wait_for(lambda: checkpointed(tmp_path) > 0, what="a first checkpoint", process=first)
        first.kill()  # SIGKILL: no hand-over, the lock stays behind (until its lease ends)
        first.wait(timeout=10)
        assert lock.holder_pid() == first.pid
        position = json.loads((tmp_path / "checkpoint.json").read_text())["position"]
        second_log = tmp_path / "second.log"
        second = start(tmp_path, second_log, lock)
        resumed = int(wait_for_line(second_log, r"resuming at event (\d+)").group(1))
        assert resumed == position
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
