"""``make demo-fleet`` (examples/fleet_demo.py): two workers and the fleet page, up and down."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nursery_down.testing import find_bindir
from tests.dashboard_helpers import http
from tests.polling import PATIENCE, wait_for, wait_for_line

DEMO = Path(__file__).resolve().parent.parent / "examples" / "fleet_demo.py"
TOKEN = "fleet-demo-test-token-58c1e2"
READY = r"fleet demo: sign in at (http://127\.0\.0\.1:\d+)/\?token=(\S+) then open the fleet"

pytestmark = pytest.mark.subprocess


def run_demo(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "demo.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    environment.update(
        FLEET_DEMO_PORTS="0,0", FLEET_JOB_SECONDS="0.2", NURSERY_DOWN_TOKEN=TOKEN, **env
    )
    with log.open("wb") as output:
        demo = subprocess.Popen(
            [sys.executable, str(DEMO)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # Ctrl-C in a terminal signals the whole group
        )
    return demo, log


def check_demo(demo: subprocess.Popen[bytes], log: Path) -> None:
    """Both workers in the fleet, jobs done; then Ctrl-C drains both and the demo ends 0."""
    try:
        url, token = wait_for_line(log, READY, process=demo).groups()
        assert token == TOKEN
        port = int(url.rsplit(":", 1)[1])

        def fleet() -> dict[str, object]:
            status, _, body = http(port, "GET", "/api/fleet", token=TOKEN)
            assert status == 200, body
            answer: dict[str, object] = json.loads(body)
            return answer

        def both_working() -> bool:
            view = fleet()
            processes = view["processes"]
            queues = view["queues"]
            assert isinstance(processes, list)
            assert isinstance(queues, list)
            running = [p for p in processes if p["state"] == "running"]
            return len(running) == 2 and any(q.get("done", 0) for q in queues)

        wait_for(both_working, what="two workers running and jobs done", process=demo)
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        assert demo.wait(PATIENCE) == 0, log.read_text()
        text = log.read_text()
        assert text.count("app fleet-demo: stopped, exit code 0") == 2, text
        assert "fleet demo: both workers stopped (exit codes [0, 0])" in text
        assert "Traceback" not in text
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


def test_the_fleet_demo_on_a_given_database(tmp_path: Path, postgres_dsn: str) -> None:
    check_demo(*run_demo(tmp_path, FLEET_DSN=postgres_dsn))


@pytest.mark.skipif(
    find_bindir() is None, reason="needs Debian's postgresql package for a throwaway cluster"
)
def test_the_fleet_demo_starts_its_own_database(tmp_path: Path) -> None:
    demo, log = run_demo(tmp_path)
    check_demo(demo, log)
    text = log.read_text()
    assert "fleet demo: starting a throwaway PostgreSQL cluster..." in text
    match = re.search(r"fleet demo: PostgreSQL in (\S+) \(removed at the end\)", text)
    assert match, text
    assert not Path(match.group(1)).exists()  # the cluster is gone with the demo
