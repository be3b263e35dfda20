"""examples/http_service.py: a drain finishes in-flight requests and refuses new work."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http_service.py"

pytestmark = pytest.mark.subprocess


def test_drain_finishes_requests_in_flight_and_readiness_goes_503(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    env = {**os.environ, "HTTP_ADDRESS": "127.0.0.1:0", "HTTP_GRACE": "5", "HTTP_PRE_DRAIN": "1.0"}
    with log.open("wb") as output:
        service = subprocess.Popen(
            [sys.executable, str(EXAMPLE)], stdout=output, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 20
        while not (match := re.search(r"serving on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert time.monotonic() < deadline, log.read_text()
            assert service.poll() is None, log.read_text()
            time.sleep(0.02)
        port = int(match.group(1))

        def get(path: str) -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        assert get("/readyz") == (200, b"ready")
        slow: dict[str, tuple[int, bytes]] = {}

        def slow_request() -> None:
            slow["answer"] = get("/work?seconds=1.5")

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(0.5)  # the slow request is in flight
        service.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Within the pre-drain window: still listening, but not ready and taking no work.
        assert get("/readyz")[0] == 503
        assert get("/work") == (503, b"draining\n")
        time.sleep(1.0)  # the window is over: no new connections
        with pytest.raises(ConnectionRefusedError):
            get("/readyz")
        worker.join(timeout=10)
        status, body = slow["answer"]
        assert status == 200, body
        assert service.wait(timeout=10) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
