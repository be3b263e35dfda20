"""The page in a real Chromium with data it must cope with: NaN, odd names, bad updates.

Plain synchronous tests, as in test_dashboard_browser.py: the dashboard runs
tests/programs/hostile_app.py in a ``nursery-down run`` subprocess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.dashboard_helpers import CHROMIUM, PATIENCE, TOKEN, http, run_program

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium"
    ),
]

TARGET = f"{Path(__file__).resolve().parent / 'programs' / 'hostile_app.py'}:sup"
#: Milliseconds Playwright waits for a page to reach a state before failing.
EXPECT_MS = 10_000


def open_page(browser: Any, url: str, errors: list[str]) -> Any:
    page = browser.new_page()
    page.set_default_timeout(EXPECT_MS)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page


def test_a_nan_job_value_and_event_keep_the_page_live(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with run_program(tmp_path, target=TARGET) as program:
        errors: list[str] = []
        page = open_page(browser, f"{program.url}/?token={program.token}", errors)
        expect(page.locator("#connection")).to_have_attribute("data-connection", "live")
        primary = page.locator('.service[data-service="db.primary-2"]')
        expect(primary.locator('[data-field="in_flight"]')).to_have_text("1")
        row = primary.locator('[data-field="jobs"] tr').first
        expect(row).to_contain_text("ratio=nan rate=-inf")
        expect(page.locator("#timeline")).to_contain_text("measured a ratio")
        # The updates that follow are read too: a drain from elsewhere shows up.
        status, _, body = http(program.port, "POST", "/api/services/_cache/drain", token=TOKEN)
        assert status == 202, body
        cache = page.locator('.service[data-service="_cache"]')
        expect(cache).to_have_attribute("data-state", "stopped")
        expect(page.locator("#connection")).to_have_attribute("data-connection", "live")
        assert errors == []
        assert program.terminate(PATIENCE)[0] == 0


@pytest.mark.parametrize("name", ["db.primary-2", "a..", "_cache"])
def test_each_button_posts_to_its_own_service(browser: Any, tmp_path: Path, name: str) -> None:
    from playwright.sync_api import expect

    with run_program(tmp_path, target=TARGET) as program:
        errors: list[str] = []
        page = open_page(browser, f"{program.url}/?token={program.token}", errors)
        expect(page.locator("#connection")).to_have_attribute("data-connection", "live")
        card = page.locator(f'.service[data-service="{name}"]')
        card.locator('[data-action="drain"] summary').click()
        with page.expect_request(lambda request: request.method == "POST") as posted:
            card.locator('[data-action="drain"] button').click()
        assert urlsplit(posted.value.url).path == f"/api/services/{name}/drain"
        expect(card).to_have_attribute("data-state", "stopped")
        for other in {"db.primary-2", "a..", "_cache"} - {name}:
            other_card = page.locator(f'.service[data-service="{other}"]')
            expect(other_card).to_have_attribute("data-state", "running")
        assert program.snapshot()["state"] == "running"
        assert errors == []
        assert program.terminate(PATIENCE)[0] == 0


def test_the_page_says_not_live_when_an_update_cannot_be_read(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    unreadable = 'retry: 100\nevent: snapshot\ndata: {"app": "hostile", "grace": NaN}\n\n'
    with run_program(tmp_path, target=TARGET) as program:
        errors: list[str] = []
        page = browser.new_page()
        page.set_default_timeout(EXPECT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route(
            "**/api/events",
            lambda route: route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body=unreadable
            ),
        )
        page.goto(f"{program.url}/?token={program.token}")
        connection = page.locator("#connection")
        expect(connection).to_contain_text("Not live: an update could not be read")
        expect(connection).not_to_have_attribute("data-connection", "live")
        # It keeps trying, and never claims to be live on what it cannot read.
        for _ in range(2):
            with page.expect_request("**/api/events"):
                pass
            expect(connection).to_contain_text("Not live: an update could not be read")
            expect(connection).not_to_have_attribute("data-connection", "live")
        # The page the server rendered is still there to read.
        expect(page.locator('.service[data-service="_cache"] [data-field="state"]')).to_have_text(
            "RUNNING"
        )
        assert errors == []
        assert program.terminate(PATIENCE)[0] == 0
