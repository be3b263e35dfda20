"""examples/http_service.py: a drain finishes in-flight requests and refuses new work."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.dashboard_helpers import URL_LINE
from tests.dashboard_helpers import http as dashboard_http
from tests.polling import PATIENCE, wait_for, wait_for_line

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http_service.py"
TOKEN = "http-service-test-token-51c3"
#: The example's pre-drain window: the test makes two requests in it.
PRE_DRAIN = 2.0
#: Longer than the window: the slow request is normally still in flight when the
#: listener closes (the test does not depend on it).
SLOW = PRE_DRAIN + 1.5

pytestmark = pytest.mark.subprocess


def test_drain_finishes_requests_in_flight_and_readiness_goes_503(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    env = {
        **os.environ,
        "HTTP_ADDRESS": "127.0.0.1:0",
        "HTTP_GRACE": "5",
        "HTTP_PRE_DRAIN": str(PRE_DRAIN),
        # The dashboard shows the requests in flight, as jobs of the service "http".
        "HTTP_DASHBOARD": "127.0.0.1:0",
        "NURSERY_DOWN_TOKEN": TOKEN,
    }
    with log.open("wb") as output:
        service = subprocess.Popen(
            [sys.executable, str(EXAMPLE)], stdout=output, stderr=subprocess.STDOUT, env=env
        )
    try:
        match = wait_for_line(log, r"serving on http://127\.0\.0\.1:(\d+)", process=service)
        port = int(match.group(1))
        dashboard = wait_for_line(log, URL_LINE.pattern, process=service)
        dashboard_port = int(dashboard.group(1).rsplit(":", 1)[1])

        def get(path: str) -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        def jobs_in_flight() -> list[str]:
            status, _, body = dashboard_http(dashboard_port, "GET", "/api/snapshot", token=TOKEN)
            assert status == 200, body
            (service_http,) = [s for s in json.loads(body)["services"] if s["name"] == "http"]
            return [job["key"] for job in service_http["jobs"]]

        assert get("/readyz") == (200, b"ready")
        slow: dict[str, tuple[int, bytes]] = {}

        def slow_request() -> None:
            slow["answer"] = get(f"/work?seconds={SLOW}")

        worker = threading.Thread(target=slow_request)
        worker.start()
        wait_for(
            lambda: "GET /work" in jobs_in_flight(),
            what="the slow request in flight",
            process=service,
        )
        service.send_signal(signal.SIGTERM)
        # The drain began: readiness says so at once, and the window is on for PRE_DRAIN s.
        wait_for(lambda: get("/readyz")[0] == 503, what="/readyz to answer 503", process=service)
        # Within the pre-drain window: still listening, but not ready and taking no work.
        assert get("/work") == (503, b"draining\n")

        def refused() -> bool:
            try:
                get("/readyz")
            except ConnectionRefusedError:
                return True
            except (ConnectionError, http.client.HTTPException):
                # Caught in the instant the listener closes (accepted, then dropped
                # unanswered): the next attempt is refused.
                return False
            return False

        # The window is over: no new connections.
        wait_for(refused, what="the listener to close")
        worker.join(timeout=PATIENCE)
        status, body = slow["answer"]
        assert status == 200, body
        assert service.wait(timeout=PATIENCE) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
