"""examples/stateful_stream.py: a drained instance hands its state and lock to the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.polling import wait_for_line

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stateful_stream.py"

pytestmark = pytest.mark.subprocess


def start(state_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAM_DIR": str(state_dir),
        "STREAM_EVENT_SECONDS": "0.005",
        "STREAM_WINDOW": "10",
    }
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, str(EXAMPLE)], stdout=output, stderr=subprocess.STDOUT, env=env
        )


def test_a_drained_instance_hands_over_to_a_waiting_one(tmp_path: Path) -> None:
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(tmp_path, first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for_line(first_log, r"resuming at event 0,")
        second = start(tmp_path, second_log)  # waits for the lock
        time.sleep(0.5)  # let both run: the first processes, the second waits
        assert "resuming" not in second_log.read_text()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        handed = int(wait_for_line(first_log, r"handing over at event (\d+)").group(1))
        assert handed > 0
        assert handed % 10 == 0  # the window in flight finished before the hand-over
        resumed = int(wait_for_line(second_log, r"resuming at event (\d+)").group(1))
        assert resumed == handed
        time.sleep(0.3)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        final = json.loads((tmp_path / "checkpoint.json").read_text())
        assert final["position"] > handed
        assert final["total"] == sum(range(final["position"]))  # nothing twice, nothing skipped
        assert not (tmp_path / "processor.lock").exists()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_a_stale_lock_from_a_killed_instance_is_taken_over(tmp_path: Path) -> None:
    log = tmp_path / "first.log"
    first = start(tmp_path, log)
    try:
        wait_for_line(log, r"resuming at event 0,")
        time.sleep(0.3)
        first.kill()  # SIGKILL: no hand-over, the lock file stays behind
        first.wait(timeout=10)
        assert (tmp_path / "processor.lock").exists()
        checkpointed = json.loads((tmp_path / "checkpoint.json").read_text())["position"]
        second_log = tmp_path / "second.log"
        second = start(tmp_path, second_log)
        resumed = int(wait_for_line(second_log, r"resuming at event (\d+)").group(1))
        assert resumed == checkpointed
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
