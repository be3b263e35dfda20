"""The per-service charts, drawn by the page from the snapshots it receives (real Chromium)."""

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

EXPECT_MS = 15_000


def test_charts_show_the_work_and_a_drain_against_its_deadline(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    # Jobs of 2-3 s and a 20 s grace: the drain stays on screen with its deadline.
    with run_program(tmp_path, DASHBOARD_APP_JOB="0.2,0.4", DASHBOARD_APP_GRACE="20") as program:
        page = browser.new_page()
        page.set_default_timeout(EXPECT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{program.url}/?token={program.token}")
        workers = page.locator('.service[data-service="workers"]')
        chart = workers.locator('svg[data-field="chart"]')
        expect(chart).to_be_visible()
        # A few seconds of samples: the lines have points and the rate is not zero.
        card = '.service[data-service="workers"]'
        page.wait_for_function(
            "(card) => Number(document.querySelector(card).dataset.samples) >= 4", arg=card
        )
        points = chart.locator("polyline.completed").get_attribute("points") or ""
        assert len(points.split()) >= 3, points
        label = re.compile(r"^Last ten minutes: \d+ in flight")
        expect(chart).to_have_attribute("aria-label", label)
        page.wait_for_function(
            "(card) => !/, 0\\.0 completed per second/.test("
            "document.querySelector(card + ' svg').getAttribute('aria-label'))",
            arg=card,
        )
        assert chart.locator("line.deadline").count() == 0

        workers.locator('[data-action="drain"] summary').click()
        workers.locator('[data-action="drain"] button').click()
        expect(workers).to_have_attribute("data-state", "draining")
        expect(chart.locator("line.deadline")).to_have_count(1)
        assert "hard-cancel in" in (chart.get_attribute("aria-label") or "")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-drain-chart.png"), full_page=True)
        assert errors == []
        assert program.terminate()[0] == 0
