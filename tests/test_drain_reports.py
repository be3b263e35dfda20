"""Drain reports: who asked, the grace, each job in flight and what became of it."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S
from nursery_down._reports import DETAILS_KEPT, REPORTS_KEPT, log_safe
from nursery_down.queues import MemoryQueue


def sleeper_service(sup: nd.Supervisor, durations: dict[str, float], *, name: str = "work") -> None:
    """A service running one job per key, each sleeping its duration."""

    @sup.service(name=name)
    async def service(ctx: nd.ServiceContext) -> None:
        entered = trio.Event()
        count = 0

        async def one(key: str, seconds: float) -> None:
            nonlocal count
            async with ctx.job(key):
                count += 1
                if count == len(durations):
                    entered.set()
                await trio.sleep(seconds)

        async with trio.open_nursery() as nursery:
            for key, seconds in durations.items():
                nursery.start_soon(one, key, seconds)
            await entered.wait()
            ctx.ready()
            await ctx.wait_draining()


async def test_service_drain_report_says_who_asked_and_what_became_of_each_job(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down")
    sup = nd.Supervisor("app", grace=30.0)
    sleeper_service(sup, {"msg-1": 1.5, "msg-2": 3.4, "msg-17": 100.0})
    with trio.fail_after(200):
        async with nd.open_supervisor(sup):
            await sup.drain("work", actor="browser 127.0.0.1")
            await sup.wait_state("work", S.STOPPED)
            [report] = sup.drain_reports()
            await sup.drain()
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["scope"] == "service"
    assert report["service"] == "work"
    assert report["action"] == "drain"
    assert report["actor"] == "browser 127.0.0.1"
    assert report["grace"] == 30.0
    assert report["duration"] == pytest.approx(30.0)
    assert (report["jobs"], report["finished"], report["hard_cancelled"]) == (3, 2, 1)
    assert report["within_grace"] is False
    assert report["longest"] == {"key": "msg-17", "outcome": "hard_cancelled", "after": 30.0}
    assert [(d["key"], d["outcome"], d["after"]) for d in report["details"]] == [
        ("msg-17", "hard_cancelled", 30.0),
        ("msg-2", "finished", pytest.approx(3.4)),
        ("msg-1", "finished", pytest.approx(1.5)),
    ]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain of work")]
    assert lines == [
        "drain of work by browser 127.0.0.1: 3 jobs, 2 finished within 3.4 s, "
        "1 cut at the 30 s grace (msg-17), hard-cancelled"
    ]


async def test_whole_app_drain_report_groups_services_and_gives_the_exit_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("app", grace=10.0)
    sleeper_service(sup, {"a-1": 6.0}, name="first")
    sleeper_service(sup, {"b-1": 4.0, "b-2": 0.5}, name="second")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.drain(actor="signal SIGTERM")
            await sup.wait_finished()
    [report] = sup.drain_reports()
    assert report["scope"] == "app"
    assert report["actor"] == "signal SIGTERM"
    assert report["exit_code"] == 0
    assert report["grace"] == 10.0
    # Stop order: second first (4 s), then first (its job ends 2 s later).
    assert report["duration"] == pytest.approx(6.0)
    assert [
        (s["service"], s["jobs"], s["finished"], s["duration"]) for s in report["services"]
    ] == [
        ("second", 2, 2, pytest.approx(4.0)),
        ("first", 1, 1, pytest.approx(2.0)),
    ]
    assert sup.last_app_drain_report() == report


async def test_a_service_cut_at_the_deadline_with_no_job_says_so(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = nd.Supervisor("app", grace=5.0)

    @sup.service
    async def lingering(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()
        await trio.sleep(60)  # outside any job: only the grace deadline ends it

    caplog.set_level(logging.INFO, logger="nursery_down")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.drain(actor="signal SIGTERM")
            await sup.wait_finished()
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain of")]
    assert lines == [
        "drain of lingering by signal SIGTERM: 0 jobs, still running at the grace deadline, "
        "and cut there, over in 5.0 s",
        "drain of the whole app by signal SIGTERM: 1 service, 0 jobs, 0 finished, 0 cut, "
        "in 5.0 s of the 5 s grace, lingering still running at the grace deadline, exit code 3",
    ]


async def test_escalate_restart_and_pool_jobs_released_to_their_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    started = [trio.Event()]

    async def handle(job: Any) -> None:
        started[-1].set()
        await trio.sleep_forever()

    sup = nd.Supervisor("app", grace=5.0)
    sup.add(nd.worker_pool(queue, handle, workers=2), name="pool")
    await queue.put("stuck\nINFO forged line")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await started[-1].wait()
            started.append(trio.Event())
            await sup.restart("pool", actor="cli")
            await started[-1].wait()  # the released job runs again after the restart
            await sup.escalate(actor="api")
            await sup.wait_finished()
    restart, escalate = sup.drain_reports()
    assert (restart["action"], restart["actor"], restart["duration"]) == ("restart", "cli", 5.0)
    assert (restart["jobs"], restart["released"]) == (1, 1)
    assert escalate["actor"] == "api"
    assert escalate["services"][0]["grace"] == 0.0
    assert escalate["services"][0]["released"] == 1
    assert escalate["exit_code"] == 3


async def test_a_drain_of_many_jobs_keeps_counts_for_all_details_for_a_few(
    autojump_clock: trio.testing.MockClock,
) -> None:
    durations = {f"job-{i}": 1.0 + i / 1000 for i in range(3 * DETAILS_KEPT)}
    sup = nd.Supervisor("app", grace=30.0)
    sleeper_service(sup, durations)
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.drain()
            await sup.wait_finished()
    [report] = sup.drain_reports()
    service = report["services"][0]
    assert (service["jobs"], service["finished"]) == (3 * DETAILS_KEPT, 3 * DETAILS_KEPT)
    assert len(service["details"]) == DETAILS_KEPT
    assert service["details_hidden"] == 2 * DETAILS_KEPT
    assert service["details"][0]["key"] == f"job-{3 * DETAILS_KEPT - 1}"


def test_log_safe_never_writes_a_raw_line_break() -> None:
    assert log_safe("msg-17\nINFO drain of x: forged") == "msg-17\\nINFO drain of x: forged"
    assert log_safe("a\\nb") == "a\\\\nb"
    assert log_safe("x" * 300, 10) == "xxxxxxxxxx... (290 more characters)"


async def test_a_key_with_a_newline_cannot_forge_a_log_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_down")
    sup = nd.Supervisor("app", grace=1.0)
    sleeper_service(sup, {"k\nINFO forged": 5.0})
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.drain(actor="api\r\nforged")
            await sup.wait_finished()
    lines = [r.getMessage() for r in caplog.records if "drain of" in r.getMessage()]
    assert lines
    assert all("\n" not in line and "\r" not in line for line in lines)
    assert "k\\nINFO forged" in lines[0]


async def test_a_rolling_restart_names_who_asked_in_each_service_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("app", grace=10.0)
    sleeper_service(sup, {"a-1": 1.0}, name="first")
    sleeper_service(sup, {"b-1": 2.0}, name="second")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.restart(actor="signal SIGHUP")
            await sup.wait_state("first", S.DRAINING)
            await sup.wait_state("first", S.RUNNING)
            await sup.wait_state("second", S.RUNNING)
            await sup.drain(actor="api")
            await sup.wait_finished()
    *restarts, last = sup.drain_reports()
    assert [(r["service"], r["action"], r["actor"]) for r in restarts] == [
        ("second", "restart", "signal SIGHUP"),
        ("first", "restart", "signal SIGHUP"),
    ]
    assert [(r["jobs"], r["finished"]) for r in restarts] == [(1, 1), (0, 0)]
    assert (last["scope"], last["actor"], last["exit_code"]) == ("app", "api", 0)
    assert [r["number"] for r in sup.drain_reports()] == [1, 2, 3]


async def test_the_last_ten_reports_are_kept(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("app")
    sleeper_service(sup, {"k": 0.5})
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            for _ in range(REPORTS_KEPT + 2):
                await sup.drain("work")
                await sup.wait_state("work", S.STOPPED)
                await sup.start("work")
                await sup.wait_state("work", S.RUNNING)
    reports = sup.drain_reports()
    assert REPORTS_KEPT == 10
    assert [r["number"] for r in reports] == list(range(4, REPORTS_KEPT + 4))
    assert reports[-1]["scope"] == "app"


async def test_a_report_details_at_most_50_jobs_the_cut_ones_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    durations = {f"job-{i}": 1.0 + i / 1000 for i in range(55)}
    durations.update({f"stuck-{i}": 100.0 for i in range(5)})
    sup = nd.Supervisor("app", grace=30.0)
    sleeper_service(sup, durations)
    with trio.fail_after(200):
        async with nd.open_supervisor(sup):
            await sup.drain("work")
            await sup.wait_state("work", S.STOPPED)
            [report] = sup.drain_reports()
            await sup.drain()
    assert (report["jobs"], report["finished"], report["hard_cancelled"]) == (60, 55, 5)
    assert len(report["details"]) == 50
    assert report["details_hidden"] == 10
    assert {d["key"] for d in report["details"][:5]} == {f"stuck-{i}" for i in range(5)}
    assert all(d["outcome"] == "finished" for d in report["details"][5:])
