"""The grace budget against the outer kill deadline, and the pre-drain delay it includes.

Timing rules run under ``autojump_clock``; the dashboard banner test uses a real
127.0.0.1 socket and the real clock.
"""

from __future__ import annotations

import logging
import math
import re
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S
from nursery_down._budget import (
    STOP_MARGIN_PER_SERVICE,
    check_seconds,
    grace_budget,
)
from nursery_down._signals import dispatch_signal
from nursery_down._validate import seconds_from_environ
from tests.dashboard_helpers import serve_dashboard

TOKEN = "budget-test-token-31c8"
#: Bound on the real-socket test.
LIMIT = 10.0


def two_services(sup: nd.Supervisor, log: list[tuple[str, float]], job_seconds: float) -> None:
    """``store`` takes no jobs; ``work`` starts a job of *job_seconds* every second."""

    @sup.service
    async def store(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    @sup.service(after=["store"])
    async def work(ctx: nd.ServiceContext) -> None:
        async def ticks() -> AsyncIterator[int]:
            n = 0
            while True:
                yield n
                n += 1
                await trio.sleep(1.0)

        async def one(n: int) -> None:
            async with ctx.job(n):
                log.append((f"start {n}", trio.current_time()))
                await trio.sleep(job_seconds)
            log.append((f"done {n}", trio.current_time()))

        ctx.ready()
        async with trio.open_nursery() as nursery:
            async for n in ctx.intake(ticks()):
                nursery.start_soon(one, n)


# -- the arithmetic -------------------------------------------------------------------


def test_budget_adds_pre_drain_grace_and_a_margin_per_service() -> None:
    budget = grace_budget(40.0, grace=30.0, pre_drain=5.0, services=3)
    assert STOP_MARGIN_PER_SERVICE == 1.0
    assert (budget.margin, budget.needed, budget.fits) == (3.0, 38.0, True)
    assert budget.warning() is None
    assert budget.describe() == (
        "pre-drain delay 5 s + grace 30 s + stop margin 3 s (1 s for each of 3 services) = 38 s"
    )
    assert grace_budget(38.0, grace=30.0, pre_drain=5.0, services=3).fits  # exactly fits


def test_warning_names_the_numbers_and_what_to_change() -> None:
    warning = grace_budget(30.0, grace=30.0, services=2).warning()
    assert warning == (
        "grace budget: grace 30 s + stop margin 2 s (1 s for each of 2 services) = 32 s, "
        "which does not fit inside the outer deadline of 30 s: jobs may be killed before "
        "their grace ends; lower the grace to at most 28 s, or raise the outer deadline "
        "(systemd TimeoutStopSec=, Kubernetes terminationGracePeriodSeconds, and "
        "NURSERY_DOWN_OUTER_DEADLINE with it) to at least 32 s"
    )


def test_warning_asks_for_a_shorter_pre_drain_when_it_alone_is_too_long() -> None:
    warning = grace_budget(10.0, grace=5.0, pre_drain=10.0, services=1).warning()
    assert warning is not None
    assert "shorten the pre-drain delay" in warning
    assert "lower the grace" not in warning


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, "30", True, None])
def test_bad_outer_deadlines_are_configuration_errors(value: object) -> None:
    with pytest.raises(nd.ConfigurationError, match="outer deadline must be a finite number"):
        check_seconds("outer deadline", value, positive=True)


def test_environment_values_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ND_TEST_SECONDS", raising=False)
    assert seconds_from_environ("ND_TEST_SECONDS", "delay") is None
    monkeypatch.setenv("ND_TEST_SECONDS", " 2.5 ")
    assert seconds_from_environ("ND_TEST_SECONDS", "delay") == 2.5
    monkeypatch.setenv("ND_TEST_SECONDS", "0")
    assert seconds_from_environ("ND_TEST_SECONDS", "delay") == 0.0
    with pytest.raises(nd.ConfigurationError, match=r"ND_TEST_SECONDS='0' is not a valid delay"):
        seconds_from_environ("ND_TEST_SECONDS", "delay", positive=True)
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv("ND_TEST_SECONDS", bad)
        with pytest.raises(nd.ConfigurationError, match="set it to a number of seconds"):
            seconds_from_environ("ND_TEST_SECONDS", "delay")


def test_run_refuses_bad_keywords_before_running() -> None:
    sup = nd.Supervisor("bad")
    with pytest.raises(nd.ConfigurationError, match="outer deadline"):
        nd.run(sup, outer_deadline=0)
    with pytest.raises(nd.ConfigurationError, match="pre-drain delay"):
        nd.run(sup, pre_drain=-1)
    with pytest.raises(nd.ConfigurationError, match="pre_drain"):
        nd.Supervisor("bad", pre_drain=math.inf)


# -- the warning at start -------------------------------------------------------------


async def test_start_warns_in_the_log_and_the_snapshot_when_the_drain_does_not_fit(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = nd.Supervisor("tight", grace=30.0)
    two_services(sup, [], job_seconds=0.5)
    with caplog.at_level(logging.INFO, logger="nursery_down"):
        async with nd.open_supervisor(sup, outer_deadline=30.0, pre_drain=2.0):
            snapshot = sup.snapshot()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == snapshot["warnings"]
    (warning,) = snapshot["warnings"]
    assert warning.startswith(
        "grace budget: pre-drain delay 2 s + grace 30 s + stop margin 2 s "
        "(1 s for each of 2 services) = 34 s, which does not fit inside the outer deadline "
        "of 30 s"
    )
    assert "lower the grace to at most 26 s" in warning
    assert snapshot["pre_drain"] == 2.0


async def test_a_budget_that_fits_logs_info_and_no_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = nd.Supervisor("roomy", grace=20.0)
    two_services(sup, [], job_seconds=0.5)
    with caplog.at_level(logging.INFO, logger="nursery_down"):
        async with nd.open_supervisor(sup, outer_deadline=30.0):
            assert sup.snapshot()["warnings"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("fits inside the outer deadline of 30 s" in r.getMessage() for r in caplog.records)


async def test_open_supervisor_refuses_a_zero_outer_deadline() -> None:
    sup = nd.Supervisor("zero")
    two_services(sup, [], job_seconds=0.5)
    with pytest.raises(nd.ConfigurationError, match="outer deadline"):
        async with nd.open_supervisor(sup, outer_deadline=0.0):
            pass  # pragma: no cover
    assert sup.app_state == "idle"


async def test_the_dashboard_shows_the_warning_as_a_banner(nursery: trio.Nursery) -> None:
    sup = nd.Supervisor("banner", grace=60.0)
    two_services(sup, [], job_seconds=0.1)
    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup, outer_deadline=30.0):
            info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=info.url, headers=headers) as client:
                page = await client.get("/")
                snapshot = (await client.get("/api/snapshot")).json()
            await sup.escalate()
    (warning,) = snapshot["warnings"]
    assert "lower the grace to at most 28 s" in warning
    assert page.status_code == 200
    banner = page.text.split('<section id="warnings"', 1)[1].split("</section>", 1)[0]
    assert "hidden" not in banner.split(">", 1)[0]
    assert "Warning: grace budget: grace 60 s + stop margin 2 s" in banner


# -- the pre-drain delay ------------------------------------------------------------------


async def test_pre_drain_keeps_serving_then_drains_with_the_full_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("lb", grace=10.0, pre_drain=5.0)
    log: list[tuple[str, float]] = []
    two_services(sup, log, job_seconds=9.5)
    async with nd.open_supervisor(sup):
        await trio.sleep(0.5)  # job 0 runs
        asked = trio.current_time()
        await sup.drain()
        snapshot = sup.snapshot()
        assert (snapshot["state"], snapshot["draining"]) == ("draining", True)
        assert snapshot["pre_drain_until"] is not None
        assert [s["state"] for s in snapshot["services"]] == ["running", "running"]
        # The grace counts from the end of the delay.
        assert sup._app.deadline == asked + 5.0 + 10.0
        await trio.sleep(4.9)
        assert sup.state_of("work") is S.RUNNING  # still serving, still taking jobs
        assert sup.snapshot()["pre_drain_until"] is not None
        await sup.wait_state("work", S.DRAINING)
        assert trio.current_time() == asked + 5.0
        assert sup.snapshot()["pre_drain_until"] is None
    starts = [at for what, at in log if what.startswith("start")]
    assert starts == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the intake stayed open for 5 s
    # Job 5 needed 9.5 s from 5.0: it ends within a grace counted from the end of the
    # delay (5.5 + 10), where one counted from the request (0.5 + 10) would cut it.
    assert ("done 5", 14.5) in log
    assert sup.exit_code == nd.EXIT_OK
    messages = [e.message for e in sup.events() if e.kind == "app"]
    assert messages[2].startswith("draining: every service keeps serving for 5 s")
    assert messages[3] == "pre-drain delay over: draining every service in stop order"


async def test_an_escalate_cuts_the_pre_drain_delay_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("hurry", grace=10.0)
    log: list[tuple[str, float]] = []
    two_services(sup, log, job_seconds=9.5)
    async with nd.open_supervisor(sup, pre_drain=30.0):
        await trio.sleep(0.5)
        await sup.drain()
        await trio.sleep(2.0)
        await sup.escalate()
        await sup.wait_finished()
        assert trio.current_time() == 2.5
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED
    assert not [what for what, _ in log if what.startswith("done")]
    assert "pre-drain delay cut short by an escalate: draining every service in stop order" in [
        e.message for e in sup.events()
    ]


async def test_a_second_sigterm_during_the_pre_drain_delay_escalates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("twice", grace=10.0, pre_drain=30.0)
    two_services(sup, [], job_seconds=9.5)
    async with nd.open_supervisor(sup):
        await trio.sleep(0.5)
        dispatch_signal(sup, signal.SIGTERM)
        await trio.sleep(1.0)
        assert sup.state_of("work") is S.RUNNING
        dispatch_signal(sup, signal.SIGTERM)
        await sup.wait_finished()
        assert trio.current_time() == 1.5
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_escalating_a_running_app_skips_the_pre_drain_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("now", grace=10.0, pre_drain=30.0)
    two_services(sup, [], job_seconds=9.5)
    async with nd.open_supervisor(sup):
        await trio.sleep(0.5)
        await sup.escalate()
        assert sup.snapshot()["pre_drain_until"] is None
        await sup.wait_finished()
        assert trio.current_time() == 0.5


async def test_extend_grace_during_the_pre_drain_delay_moves_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("longer", grace=10.0, pre_drain=5.0)
    log: list[tuple[str, float]] = []
    two_services(sup, log, job_seconds=14.0)
    async with nd.open_supervisor(sup):
        await trio.sleep(0.5)
        await sup.drain()
        await sup.extend_grace(10.0)
        await sup.wait_finished()
    # Job 0 (0 -> 14) and the others that started during the delay fit the 25.5 s deadline.
    assert sup.exit_code == nd.EXIT_OK
    assert ("done 5", 19.0) in log


# -- the deploy examples agree with themselves ------------------------------------------------


def test_the_example_systemd_unit_and_manifest_fit_their_budgets() -> None:
    deploy = Path(__file__).resolve().parent.parent / "examples" / "deploy"

    def number(pattern: str, text: str) -> float:
        found = re.search(pattern, text, re.MULTILINE)
        assert found is not None, pattern
        return float(found.group(1))

    unit = (deploy / "nursery-down-queue-worker.service").read_text()
    stop = number(r"^TimeoutStopSec=(\d+)$", unit)
    assert number(r"^Environment=NURSERY_DOWN_OUTER_DEADLINE=(\d+)$", unit) == stop
    assert "Type=notify\n" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in unit
    unit_budget = grace_budget(stop, grace=number(r"--grace (\d+)", unit), services=3)
    assert unit_budget.fits, unit_budget.warning()

    manifest = (deploy / "deployment.yaml").read_text()
    period = number(r"terminationGracePeriodSeconds: (\d+)", manifest)
    assert number(r'- name: NURSERY_DOWN_OUTER_DEADLINE\n\s+value: "(\d+)"', manifest) == period
    budget = grace_budget(
        period,
        grace=number(r'- --grace\n\s+- "(\d+)"', manifest),
        pre_drain=number(r'- name: NURSERY_DOWN_PRE_DRAIN\n\s+value: "(\d+)"', manifest),
        services=3,
    )
    assert budget.fits, budget.warning()
    assert budget.pre_drain == 5.0
    for needed in ("path: /readyz", "path: /livez", "secretKeyRef", "0.0.0.0:8080"):
        assert needed in manifest
