"""Browser sessions (expiry, sign-out, a new token), token guessing, and weak tokens."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

import nursery_down as nd
from tests.dashboard_helpers import DashboardInfo, run_to_exit, serve_dashboard

if TYPE_CHECKING:
    # mypy knows the source folder as "dashboard"; it is installed as nursery_down.dashboard.
    import dashboard._auth as auth
    from dashboard._throttle import FailedAttempts
else:
    import nursery_down.dashboard._auth as auth
    from nursery_down.dashboard._throttle import FailedAttempts

TOKEN = "session-test-token-7e3a91"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 10.0
HOST = "127.0.0.1:8080"


class Clock:
    """Wall-clock time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make_supervisor() -> nd.Supervisor:
    sup = nd.Supervisor(name="sessions", grace=5.0)

    @sup.service
    async def quiet(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    return sup


@pytest.fixture
async def dashboard(nursery: trio.Nursery) -> AsyncIterator[tuple[nd.Supervisor, DashboardInfo]]:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
    yield sup, info
    with trio.fail_after(LIMIT):
        if sup.running:
            await sup.drain()
        await sup.wait_finished()


# -- sessions ---------------------------------------------------------------------------------


def test_a_session_expires_after_twelve_hours() -> None:
    clock = Clock()
    guard = auth.Guard(TOKEN, frozenset({HOST}), clock=clock)
    cookie = guard.new_session(HOST)
    cookies = {guard.cookie_name: cookie}
    assert guard.credential({}, cookies, HOST) == "browser"
    clock.now += 12 * 3600 - 1
    assert guard.credential({}, cookies, HOST) == "browser"
    clock.now += 2
    assert guard.credential({}, cookies, HOST) is None


def test_a_session_is_bound_to_its_token_and_its_host() -> None:
    clock = Clock()
    guard = auth.Guard(TOKEN, frozenset({HOST}), clock=clock)
    cookie = guard.new_session(HOST)
    rotated = auth.Guard(f"{TOKEN}-new", frozenset({HOST}), clock=clock)
    assert rotated.cookie_name != guard.cookie_name
    # Even under the new token's cookie name, a cookie signed with the old one is refused.
    assert rotated.credential({}, {rotated.cookie_name: cookie}, HOST) is None
    # A dashboard on another port of the same host, with the same token, refuses it too.
    assert guard.credential({}, {guard.cookie_name: cookie}, "127.0.0.1:8081") is None
    assert guard.credential({}, {guard.cookie_name: cookie + "x"}, HOST) is None
    assert guard.credential({}, {guard.cookie_name: "forged.AAAA.BBBB"}, HOST) is None


def test_signing_out_revokes_only_that_session() -> None:
    guard = auth.Guard(TOKEN, frozenset({HOST}), clock=Clock())
    first, second = guard.new_session(HOST), guard.new_session(HOST)
    assert guard.end_session(first, HOST)
    assert not guard.end_session(first, HOST)  # already ended
    assert not guard.end_session("not a cookie", HOST)
    assert guard.credential({}, {guard.cookie_name: first}, HOST) is None
    assert guard.credential({}, {guard.cookie_name: second}, HOST) == "browser"


def test_revoked_sessions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_REVOKED", 5)
    clock = Clock()
    guard = auth.Guard(TOKEN, frozenset({HOST}), clock=clock)
    ended = [guard.new_session(HOST) for _ in range(5)]
    kept = guard.new_session(HOST)
    for cookie in ended:
        assert guard.end_session(cookie, HOST)
    assert len(guard._revoked) == 5
    clock.now += 1
    # One more sign-out would pass the bound: every session signed in before it ends.
    assert guard.end_session(guard.new_session(HOST), HOST)
    assert len(guard._revoked) == 0
    assert guard.credential({}, {guard.cookie_name: kept}, HOST) is None
    assert all(guard.credential({}, {guard.cookie_name: c}, HOST) is None for c in ended)
    clock.now += 1
    assert guard.credential({}, {guard.cookie_name: guard.new_session(HOST)}, HOST) == "browser"


async def test_sign_in_sets_an_expiring_cookie_and_sign_out_revokes_it(
    dashboard: tuple[nd.Supervisor, DashboardInfo], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down.audit")
    _, info = dashboard
    origin = {"Origin": info.url}
    with trio.fail_after(LIMIT):
        async with httpx.AsyncClient(base_url=info.url) as browser:
            signed_in = await browser.get("/", params={"token": TOKEN})
            name, value = next(iter(browser.cookies.items()))
            assert (await browser.get("/api/snapshot")).status_code == 200
            page = await browser.get("/")
            cross_site = await browser.post("/logout", headers={"Origin": "http://evil.example"})
            assert (await browser.get("/api/snapshot")).status_code == 200
            signed_out = await browser.post(
                "/logout",
                content=b"",
                headers={
                    **origin,
                    "Accept": "text/html",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
            after = await browser.get("/api/snapshot")
        async with httpx.AsyncClient(base_url=info.url, cookies={name: value}) as replay:
            replayed = await replay.get("/api/snapshot")
            replayed_logout = await replay.post("/logout", headers=origin)
    cookie = signed_in.headers["set-cookie"]
    assert "Max-Age=43200" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    assert 'action="/logout"' in page.text
    assert cross_site.status_code == 403
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == "/"
    assert "Max-Age=0" in signed_out.headers["set-cookie"]
    assert after.status_code == 401
    assert replayed.status_code == 401  # the copy of the cookie is dead too
    assert replayed_logout.status_code == 401
    audit = [r.getMessage() for r in caplog.records if r.name == "nursery_down.audit"]
    assert "sign out by browser 127.0.0.1: accepted" in audit


async def test_sign_out_with_the_token_answers_json(
    dashboard: tuple[nd.Supervisor, DashboardInfo],
) -> None:
    _, info = dashboard
    with trio.fail_after(LIMIT):
        async with httpx.AsyncClient(base_url=info.url) as client:
            response = await client.post("/logout", headers=BEARER)
            anonymous = await client.post("/logout")
    assert response.status_code == 200
    assert response.json() == {"signed_out": False}
    assert anonymous.status_code == 401


# -- token guessing ----------------------------------------------------------------------------


def test_failed_attempts_make_an_address_wait_out_its_window() -> None:
    clock = Clock()
    attempts = FailedAttempts(limit=3, window=60.0, clock=clock)
    assert [attempts.failed("10.0.0.1") for _ in range(3)] == [False, False, True]
    assert attempts.retry_after("10.0.0.1") == 60.0
    assert attempts.retry_after("10.0.0.2") is None
    clock.now += 59.5
    assert attempts.retry_after("10.0.0.1") == 0.5
    clock.now += 0.5
    assert attempts.retry_after("10.0.0.1") is None
    assert attempts.failed("10.0.0.1") is False  # a new window


def test_failed_attempts_remember_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    attempts = FailedAttempts(limit=3, window=60.0, max_addresses=100, clock=clock)
    for number in range(10_000):
        attempts.failed(f"10.0.{number // 256}.{number % 256}")
        assert len(attempts) <= 100
    for _ in range(3):
        attempts.failed("192.0.2.1")
    assert attempts.retry_after("192.0.2.1") is not None


async def test_repeated_wrong_tokens_get_429_and_one_audit_line(
    dashboard: tuple[nd.Supervisor, DashboardInfo], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down.audit")
    _, info = dashboard
    with trio.fail_after(LIMIT):
        async with httpx.AsyncClient(base_url=info.url) as client:
            wrong = [
                await client.get("/api/snapshot", headers={"Authorization": f"Bearer guess-{n}"})
                for n in range(8)
            ]
            wrong.append(await client.get("/", params={"token": "guess-8"}))
            wrong.append(await client.post("/login", data={"token": "guess-9"}))
            right = await client.get("/api/snapshot", headers=BEARER)
            signing_in = await client.get("/", params={"token": TOKEN})
            again = await client.post("/api/drain", headers=BEARER)
            probe = await client.get("/livez")
    assert [r.status_code for r in wrong] == [401] * 10
    for refused in (right, signing_in, again):
        assert refused.status_code == 429
        assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert "too many wrong tokens" in right.json()["error"]
    assert probe.status_code == 200
    guessing = [
        r.getMessage()
        for r in caplog.records
        if r.name == "nursery_down.audit" and "429" in r.getMessage()
    ]
    assert guessing == [
        "guess the operator token by unknown 127.0.0.1: refused 429: 10 wrong tokens "
        "within 60 s; this address waits until the window ends"
    ]


# -- weak tokens on open addresses -------------------------------------------------------------


@pytest.mark.parametrize("token", ["a", " ", " " * 20, "x" * 15, "\t" * 16 + "short"])
async def test_a_short_token_is_refused_beyond_loopback(token: str) -> None:
    with (
        trio.fail_after(LIMIT),
        pytest.raises(nd.ConfigurationError, match="use at least 16") as refused,
    ):
        await serve_dashboard(make_supervisor(), "0.0.0.0:0", token=token)
    assert "\n" not in str(refused.value)


async def test_open_supervisor_refuses_a_short_token_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NURSERY_DOWN_TOKEN", "short")
    refused = pytest.RaisesGroup(
        pytest.RaisesExc(nd.ConfigurationError, match="use at least 16"), flatten_subgroups=True
    )
    with trio.fail_after(LIMIT), refused:
        async with nd.open_supervisor(make_supervisor(), dashboard="0.0.0.0:0"):
            pass


async def test_a_short_token_is_fine_on_loopback(nursery: trio.Nursery) -> None:
    sup = make_supervisor()
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token="a"))
        assert info.token == "a"
        await sup.drain()
        await sup.wait_finished()


def test_run_with_a_short_token_on_an_open_address_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    code, stderr = run_to_exit(tmp_path, "--dashboard", "0.0.0.0:0", NURSERY_DOWN_TOKEN="a")
    assert code == 2
    assert stderr.count("\n") == 1, stderr
    assert "with a token of 1 characters" in stderr
    assert "use at least 16" in stderr
