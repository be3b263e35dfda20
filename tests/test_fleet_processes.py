"""A fleet of real worker processes on one PostgreSQL queue: seen and driven from any one.

Two ``nursery-down run tests/programs/fleet_worker.py:sup`` processes share a queue,
so both join the fleet in its database. Everything an operator does here goes
through the dashboard of the first one only: the fleet list (API, CLI, page), and
drains that travel to the other process through the database. Synchronisation is
on observable state: URL lines, HTTP answers, exit codes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_helpers import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    Program,
    http,
    run_program,
)
from tests.polling import PATIENCE, wait_for

pytestmark = pytest.mark.subprocess

TARGET = str(Path(__file__).resolve().parent / "programs" / "fleet_worker.py") + ":sup"
#: Seconds between the workers' fleet reports (gone after three silent ones).
INTERVAL = "0.3"


@contextmanager
def two_workers(tmp_path: Path, dsn: str) -> Iterator[tuple[Program, Program]]:
    """The producing worker A and a second worker B, both up and in the fleet."""
    with ExitStack() as stack:
        env = {"FLEET_DSN": dsn, "NURSERY_DOWN_FLEET_INTERVAL": INTERVAL}
        a = stack.enter_context(run_program(tmp_path, target=TARGET, FLEET_PRODUCE="1", **env))
        b = stack.enter_context(run_program(tmp_path, target=TARGET, **env))
        wait_for(
            lambda: (
                {p["pid"] for p in fleet(a) if p["state"] == "running"}
                == {a.process.pid, b.process.pid}
            ),
            what="both workers running in the fleet",
            process=a.process,
        )
        yield a, b


def fleet(program: Program) -> list[dict[str, Any]]:
    status, _, body = http(program.port, "GET", "/api/fleet", token=program.token)
    assert status == 200, body
    processes: list[dict[str, Any]] = json.loads(body)["processes"]
    return processes


def process_of(program: Program, pid: int) -> dict[str, Any]:
    (found,) = [p for p in fleet(program) if p["pid"] == pid]
    return found


def completed(program: Program) -> int:
    count: int = program.service("invoices")["completed"]
    return count


def cli(program: Program, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    return subprocess.run(
        [sys.executable, "-m", "nursery_down", "fleet", *args, "--url", program.url],
        env={**environment, "NURSERY_DOWN_TOKEN": program.token},
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )


def test_the_cli_lists_the_fleet_and_drains_another_process(
    tmp_path: Path, postgres_dsn: str
) -> None:
    with two_workers(tmp_path, postgres_dsn) as (a, b):
        listed = cli(a)
        assert listed.returncode == 0, listed.stderr
        b_row = process_of(a, b.process.pid)
        assert b_row["name"] in listed.stdout
        assert "RUNNING" in listed.stdout
        assert "invoices" in listed.stdout.split("QUEUE", 1)[1]  # the queue's figures

        drained = cli(a, "drain", str(b.process.pid))
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.strip() == (
            f"drain process {b_row['name']} ({b_row['id']}): accepted"
        )
        assert b.process.wait(PATIENCE) == 0
        # The other process keeps working.
        before = completed(a)
        wait_for(
            lambda: completed(a) > before + 5, what="A keeps completing jobs", process=a.process
        )
        assert "via the fleet, from" in b.stderr()
        assert process_of(a, b.process.pid)["state"] == "stopped"

        refused = cli(a, "drain", str(b.process.pid))
        assert refused.returncode == 2
        assert "has stopped: it cannot drain" in refused.stderr
        unknown = cli(a, "restart", "no-such-process")
        assert (unknown.returncode, unknown.stderr.strip()) == (
            2,
            "nursery-down: error: no process 'no-such-process' in the fleet; list them with "
            "'nursery-down fleet'",
        )
        assert "Traceback" not in a.stderr() + b.stderr()


def test_a_killed_process_is_shown_as_gone(tmp_path: Path, postgres_dsn: str) -> None:
    with two_workers(tmp_path, postgres_dsn) as (a, b):
        b.process.send_signal(signal.SIGKILL)
        b.process.wait(PATIENCE)
        gone = wait_for(
            lambda: (row := process_of(a, b.process.pid))["state"] == "gone" and row,
            what="B shown as gone",
            process=a.process,
        )
        assert gone["heartbeat_age"] > 3 * float(INTERVAL)
        status, _, body = http(
            a.port,
            "POST",
            f"/api/fleet/processes/{gone['id']}/drain",
            token=a.token,
            headers={"Content-Type": "application/json"},
            body=b"{}",
        )
        assert status == 409, body
        assert "has gone away" in json.loads(body)["error"]


def test_the_fleet_api_refuses_what_it_cannot_do(tmp_path: Path, postgres_dsn: str) -> None:
    with two_workers(tmp_path, postgres_dsn) as (a, b):
        b_id = process_of(a, b.process.pid)["id"]
        json_body = {"Content-Type": "application/json"}
        cases = [
            ("POST", "/api/fleet/processes/ffffffffffff/drain", None, b"{}", 404),
            ("POST", "/api/fleet/processes/..%2F..%2Fapi%2Fdrain/drain", None, b"{}", 404),
            ("POST", f"/api/fleet/processes/{b_id}/explode", None, b"{}", 404),
            ("POST", f"/api/fleet/processes/{b_id}/start", None, b"{}", 400),
            ("POST", f"/api/fleet/processes/{b_id}/drain", None, b"[1]", 400),
            ("GET", f"/api/fleet/processes/{b_id}/drain", None, b"", 405),
            ("POST", f"/api/fleet/processes/{b_id}/drain", "wrong-token", b"{}", 401),
        ]
        for method, path, token, body, expected in cases:
            status, _, answer = http(
                a.port, method, path, token=token or a.token, headers=json_body, body=body
            )
            assert status == expected, (path, answer)
            assert "error" in json.loads(answer), answer
        cross_site = {**json_body, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
        status, _, _ = http(
            a.port,
            "POST",
            f"/api/fleet/processes/{b_id}/drain",
            token=a.token,
            headers=cross_site,
            body=b"{}",
        )
        assert status == 403
        status, _, answer = http(
            a.port,
            "POST",
            f"/api/fleet/processes/{b_id}/start",
            token=a.token,
            headers=json_body,
            body=b'{"service": "nope"}',
        )
        assert status == 409
        assert "unknown service 'nope'" in json.loads(answer)["error"]
        assert b.process.poll() is None  # none of it reached B as an action it carried out


def test_an_upgrade_asked_through_the_fleet_shows_the_next_generation(
    tmp_path: Path, postgres_dsn: str, subreaper: None
) -> None:
    env = {"FLEET_DSN": postgres_dsn, "NURSERY_DOWN_FLEET_INTERVAL": INTERVAL}
    with (
        run_program(tmp_path, target=TARGET, FLEET_PRODUCE="1", **env) as a,
        run_program(tmp_path, target=TARGET, NURSERY_DOWN_VERSION="1.4.2", **env) as b,
    ):
        old = wait_for(
            lambda: [p for p in fleet(a) if p["pid"] == b.process.pid and p["state"] == "running"],
            what="B running in the fleet",
            process=b.process,
        )[0]
        assert (old["version"], old["generation"]) == ("1.4.2", 1)
        upgraded = cli(a, "upgrade", old["id"])
        assert upgraded.returncode == 0, upgraded.stderr
        assert "accepted: the new generation (pid " in upgraded.stdout
        new_pid = int(upgraded.stdout.split("(pid ", 1)[1].split(")", 1)[0])
        try:
            assert b.process.wait(PATIENCE) == 0  # the old generation drained and exited
            new = wait_for(
                lambda: [p for p in fleet(a) if p["pid"] == new_pid and p["state"] == "running"],
                what="the new generation running in the fleet",
                process=a.process,
            )[0]
            assert (new["version"], new["generation"], new["app"]) == ("1.4.2", 2, "invoices")
            assert process_of(a, b.process.pid)["state"] == "stopped"
            os.kill(new_pid, signal.SIGTERM)
            _, status = os.waitpid(new_pid, 0)  # ours: we are the subreaper
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(new_pid, signal.SIGKILL)
                os.waitpid(new_pid, 0)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")
def test_the_fleet_page_drains_one_process_of_two(tmp_path: Path, postgres_dsn: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with two_workers(tmp_path, postgres_dsn) as (a, b), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(PATIENCE * 1000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            dialogs: list[str] = []

            def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                dialog.accept()

            page.on("dialog", accept)
            page.goto(f"{a.url}/?token={a.token}")  # signs in; the page links the fleet
            page.locator("#fleet-link").click()
            expect(page).to_have_url(f"{a.url}/fleet")
            expect(page.locator("#connection")).to_have_attribute("data-connection", "live")
            b_row = process_of(a, b.process.pid)
            card = page.locator(f'.process[data-process="{b_row["id"]}"]')
            expect(card).to_have_attribute("data-state", "running")
            expect(page.locator("#queues")).to_contain_text("invoices")
            card.locator('[data-field="actions"] [data-action="drain"] button').click()
            expect(page.locator("#notice")).to_contain_text(
                f"Drain process {b_row['name']}: accepted"
            )
            assert b.process.wait(PATIENCE) == 0
            expect(card).to_have_attribute("data-state", "stopped")
            expect(card.locator('[data-field="exit_code"]')).to_have_text("0")
            expect(card.locator('[data-field="actions"] button')).to_have_count(0)
            a_card = page.locator(f'.process[data-process="{process_of(a, a.process.pid)["id"]}"]')
            expect(a_card).to_have_attribute("data-state", "running")
            assert dialogs
            assert dialogs[0].startswith(f"Drain process {b_row['name']}?")
            page.screenshot(path=str(ARTIFACTS / "fleet-page.png"))
            assert errors == []
        finally:
            browser.close()
        before = completed(a)
        wait_for(
            lambda: completed(a) > before + 5, what="A keeps completing jobs", process=a.process
        )
    assert TOKEN  # the workers share the operator token


def test_a_process_whose_service_closed_its_queue_still_exits_0(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # The fleet's last report comes after the queue's owner closed it: the report
    # leaves that queue out rather than reading it.
    target = str(Path(__file__).resolve().parent / "programs" / "fleet_queue_owner.py") + ":sup"
    env = {"FLEET_DSN": postgres_dsn, "NURSERY_DOWN_FLEET_INTERVAL": INTERVAL}
    with run_program(tmp_path, target=target, **env) as program:
        wait_for(
            lambda: [p["state"] for p in fleet(program)] == ["running"],
            what="the process running in the fleet",
            process=program.process,
        )
        code, _ = program.terminate()
    assert code == 0, program.stderr()
    assert "Traceback" not in program.stderr()


def test_a_process_in_no_fleet_says_how_to_join_one(tmp_path: Path) -> None:
    with run_program(tmp_path) as program:
        for method, path in (("GET", "/api/fleet"), ("POST", "/api/fleet/processes/x/drain")):
            status, _, body = http(
                program.port,
                method,
                path,
                token=program.token,
                headers={"Content-Type": "application/json"},
                body=b"{}" if method == "POST" else b"",
            )
            assert status == 404, body
            assert json.loads(body)["error"].startswith("this process is not in a fleet: run it")
        listed = cli(program)
        assert listed.returncode == 2
        assert "this process is not in a fleet" in listed.stderr
        assert program.terminate()[0] == 0
