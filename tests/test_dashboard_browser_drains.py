"""In Chromium: where a stuck job waits, opened during a drain, and the drain's report after it.

A plain synchronous test driving ``nursery-down run tests/programs/stuck_app.py:sup``
in a subprocess; screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_helpers import ARTIFACTS, CHROMIUM, run_program

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium"
    ),
]

PROGRAM = Path(__file__).resolve().parent / "programs" / "stuck_app.py"
#: Milliseconds Playwright waits for a page to reach a state before failing.
EXPECT_MS = 10_000


def test_operator_sees_where_a_stuck_job_waits_and_the_drain_report(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with run_program(tmp_path, target=f"{PROGRAM}:sup", STUCK_APP_GRACE="4") as program:
        page = browser.new_page()
        page.set_default_timeout(EXPECT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{program.url}/?token={program.token}")
        expect(page.locator("#connection")).to_have_attribute("data-connection", "live")
        expect(page.locator("#drain-report")).to_be_hidden()

        loader = page.locator('.service[data-service="loader"]')
        loader.locator('[data-action="drain"] summary').click()
        loader.locator('[data-action="drain"] button').click()
        expect(loader).to_have_attribute("data-state", "draining")
        # slow-1 finishes 0.2 s into the drain; stuck-1 is left, waiting.
        expect(loader.locator('[data-field="in_flight"]')).to_have_text("1")

        stuck = loader.locator('tr[data-key="stuck-1"]')
        stuck.locator("details.stack summary").click()
        chain = stuck.locator('[data-field="stack"]')
        expect(chain).to_contain_text("wait_for_the_database")
        expect(chain).to_contain_text(f"{PROGRAM}:")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "stuck-job-chain.png"), full_page=True)

        # At the 4 s grace the stuck job is cut; the report takes the stage.
        expect(loader).to_have_attribute("data-state", "stopped")
        report = page.locator("#drain-report")
        expect(report).to_be_visible()
        # slow-1 takes 0.2 s and a little scheduling: "within 0.2 s", or a little more.
        expect(report.locator('[data-field="drain_summary"]')).to_have_text(
            re.compile(
                r"^drain of loader by browser 127\.0\.0\.1: 2 jobs, 1 finished within 0\.\d s, "
                r"1 cut at the 4 s grace \(stuck-1\), hard-cancelled$"
            )
        )
        rows = report.locator('[data-field="drain_jobs"] tr')
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text("stuck-1")
        expect(rows.nth(0)).to_contain_text("hard-cancelled")
        expect(rows.nth(1)).to_contain_text("slow-1")
        expect(rows.nth(1)).to_contain_text("finished")
        page.screenshot(path=str(ARTIFACTS / "drain-report.png"), full_page=True)
        assert errors == []
