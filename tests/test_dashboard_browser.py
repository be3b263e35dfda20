"""The dashboard page in a real Chromium (Debian's), driven by Playwright's sync API.

Plain synchronous tests: the dashboard runs in a ``nursery-down run`` subprocess, so
Playwright keeps the test's thread to itself. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_helpers import (
    ARTIFACTS,
    CHROMIUM,
    PATIENCE,
    run_program,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium"
    ),
]

#: Milliseconds Playwright waits for a page to reach a state before failing.
EXPECT_MS = 10_000


def test_operator_drains_and_starts_one_service(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Jobs of 1-2 s: a drain stays visible while the jobs in flight finish.
    with run_program(tmp_path, DASHBOARD_APP_JOB="1.0,2.0") as program:
        page = browser.new_page()
        page.set_default_timeout(EXPECT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        page.goto(f"{program.url}/?token={program.token}")
        assert page.url == f"{program.url}/", "the token must leave the address bar"
        expect(page.locator("#connection")).to_have_attribute("data-connection", "live")

        workers = page.locator('.service[data-service="workers"]')
        others = [page.locator(f'.service[data-service="{name}"]') for name in ("intake", "mailer")]
        in_flight = '.service[data-service="workers"] [data-field="in_flight"]'
        first = page.locator(in_flight).text_content()
        page.wait_for_function(
            "([selector, first]) => document.querySelector(selector).textContent !== first",
            arg=[in_flight, first],
        )

        workers.locator('[data-action="drain"] summary').click()
        impact = workers.locator('[data-action="drain"] .impact')
        expect(impact).to_contain_text(re.compile(r"jobs? in flight, oldest .*; grace 30 s"))
        workers.locator('[data-action="drain"] button').click()

        expect(workers).to_have_attribute("data-state", "draining")
        expect(workers.locator('[data-field="state"]')).to_have_text("DRAINING")
        for other in others:
            expect(other).to_have_attribute("data-state", "running")
        expect(workers).to_have_attribute("data-state", "stopped")
        expect(workers.locator('[data-field="in_flight"]')).to_have_text("0")
        for other in others:
            expect(other).to_have_attribute("data-state", "running")
        expect(page.locator("#timeline")).to_contain_text(
            "drain service workers (by browser 127.0.0.1)"
        )

        workers.locator('[data-action="start"] summary').click()
        workers.locator('[data-action="start"] button').click()
        expect(workers).to_have_attribute("data-state", "running")
        expect(workers.locator('[data-field="state"]')).to_have_text("RUNNING")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # The page notices when the server goes away.
        code, _ = program.terminate()
        assert code == 0
        expect(page.locator("#connection")).not_to_have_attribute("data-connection", "live")
        assert errors == []


def test_page_works_without_javascript(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with run_program(tmp_path, DASHBOARD_APP_JOB="0.1,0.3") as program:
        context = browser.new_context(java_script_enabled=False)
        page = context.new_page()
        page.set_default_timeout(EXPECT_MS)
        page.goto(f"{program.url}/?token={program.token}")
        mailer = page.locator('.service[data-service="mailer"]')
        expect(mailer.locator('[data-field="state"]')).to_have_text("RUNNING")
        expect(page.locator("#connection")).to_have_attribute("data-connection", "static")

        # The action forms post and come back to the page.
        mailer.locator('[data-action="drain"] summary').click()
        with page.expect_navigation():
            mailer.locator('[data-action="drain"] button').click()
        assert page.url == f"{program.url}/", page.content()
        assert mailer.get_attribute("data-state") in ("draining", "stopped")
        while mailer.get_attribute("data-state") != "stopped":
            page.reload()  # without JavaScript, reloading is how the page updates
            assert program.process.poll() is None
        mailer.locator('[data-action="start"] summary').click()
        with page.expect_navigation():
            mailer.locator('[data-action="start"] button').click()
        assert page.url == f"{program.url}/"
        assert mailer.get_attribute("data-state") in ("starting", "running")
        context.close()
        assert program.terminate(PATIENCE)[0] == 0


def test_page_stays_usable_with_a_thousand_jobs_in_flight(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    env = {
        "DASHBOARD_APP_WORKERS": "1000",
        "DASHBOARD_APP_JOB": "30,40",
        "DASHBOARD_APP_GRACE": "0.5",
    }
    with run_program(tmp_path, **env) as program:
        page = browser.new_page()
        page.set_default_timeout(EXPECT_MS)
        page.goto(f"{program.url}/?token={program.token}")
        expect(page.locator("#connection")).to_have_attribute("data-connection", "live")
        workers = page.locator('.service[data-service="workers"]')
        expect(workers.locator('[data-field="in_flight"]')).to_have_text("1000")
        expect(workers.locator('[data-field="jobs_hidden"]')).to_have_text("950 more hidden")
        expect(workers.locator('[data-field="jobs"] tr')).to_have_count(50)
        # The page keeps up: clicking opens an action at once.
        workers.locator('[data-action="escalate"] summary').click()
        expect(workers.locator('[data-action="escalate"] .impact')).to_have_text(
            "Hard-cancels 1000 jobs in flight now; they go back to their source."
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-1000-jobs.png"))
        code, _ = program.terminate()
        assert code == 3  # the short grace cut the jobs: hard-cancelled
