"""Lifecycle rules of the Supervisor: order, restarts, backoff, intensity, isolation."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S


def no_jitter(initial: float = 0.1) -> nd.Backoff:
    return nd.Backoff(initial=initial, factor=2.0, maximum=30.0, jitter=0.0)


async def idle_until_drained(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await ctx.wait_draining()


async def test_services_start_in_order_each_waiting_for_ready(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("order")
    started: dict[str, float] = {}

    @sup.service
    async def first(ctx: nd.ServiceContext) -> None:
        started["first"] = trio.current_time()
        await trio.sleep(2)
        ctx.ready()
        await ctx.wait_draining()

    @sup.service
    async def second(ctx: nd.ServiceContext) -> None:
        started["second"] = trio.current_time()
        await idle_until_drained(ctx)

    async with nd.open_supervisor(sup):
        assert sup.state_of("first") is S.RUNNING
        assert sup.state_of("second") is S.RUNNING
    assert started == {"first": 0.0, "second": 2.0}


async def test_after_moves_a_dependency_first_and_stop_is_reverse() -> None:
    sup = nd.Supervisor("deps")
    sup.add(idle_until_drained, name="api", after=["db"])
    sup.add(idle_until_drained, name="worker", after=["db"])
    sup.add(idle_until_drained, name="db")
    async with nd.open_supervisor(sup):
        assert sup.service_names == ["db", "api", "worker"]
    stopped = [e.service for e in sup.events() if e.kind == "state" and e.state == "stopped"]
    assert stopped == ["worker", "api", "db"]


async def test_crash_restarts_with_exponential_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("backoff", max_restarts=4, within=100.0, backoff=no_jitter(0.5))
    starts: list[float] = []

    @sup.service
    async def flaky(ctx: nd.ServiceContext) -> None:
        starts.append(trio.current_time())
        ctx.ready()
        raise ValueError("boom")

    sup.add(idle_until_drained, name="steady")
    async with nd.open_supervisor(sup):
        await sup.wait_state("flaky", S.FAILED)
    # 0.5, 1, 2, 4 s between the five runs, then the fifth crash exceeds 4 restarts.
    assert starts == [0.0, 0.5, 1.5, 3.5, 7.5]
    assert sup.snapshot()["services"][0]["restarts"] == 4
    assert sup.exit_code == nd.EXIT_FAILED


async def test_backoff_jitter_stays_within_its_band(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor(
        "jitter",
        max_restarts=3,
        backoff=nd.Backoff(initial=1.0, factor=2.0, jitter=0.25),
        seed=7,
    )
    starts: list[float] = []

    @sup.service(restart="transient")
    async def flaky(ctx: nd.ServiceContext) -> None:
        starts.append(trio.current_time())
        raise RuntimeError("again")

    async with nd.open_supervisor(sup):
        await sup.wait_state("flaky", S.FAILED)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    for gap, base in zip(gaps, [1.0, 2.0, 4.0], strict=True):
        assert base * 0.75 <= gap <= base * 1.25
    assert gaps != [1.0, 2.0, 4.0]


async def test_restart_intensity_counts_only_restarts_inside_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("window", max_restarts=2, within=10.0, backoff=no_jitter(0.1))
    runs = 0

    @sup.service
    async def slow_crasher(ctx: nd.ServiceContext) -> None:
        nonlocal runs
        runs += 1
        ctx.ready()
        await trio.sleep(6)  # crashes every ~6 s: at most 2 restarts in any 10 s
        if runs < 6:
            raise ValueError("crash")
        await ctx.wait_draining()

    async with nd.open_supervisor(sup):
        await sup.wait_state("slow_crasher", S.RUNNING)
        while runs < 6:
            await trio.sleep(1)
        assert sup.state_of("slow_crasher") is S.RUNNING
    assert sup.exit_code == nd.EXIT_OK


async def test_crashing_service_never_cancels_its_siblings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("isolation", max_restarts=0)
    done = trio.Event()

    @sup.service
    async def steady(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("long"):
            await trio.sleep(10)
        done.set()
        await ctx.wait_draining()

    @sup.service
    async def crasher(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await trio.sleep(1)
        raise ValueError("crash")

    async with nd.open_supervisor(sup):
        await sup.wait_state("crasher", S.FAILED)
        assert sup.state_of("steady") is S.RUNNING
        await done.wait()
        assert trio.current_time() == 10.0
    assert sup.exit_code == nd.EXIT_FAILED


@pytest.mark.parametrize(
    ("policy", "error", "expected"),
    [
        ("permanent", False, S.BACKOFF),
        ("permanent", True, S.BACKOFF),
        ("transient", False, S.STOPPED),
        ("transient", True, S.BACKOFF),
        ("temporary", False, S.STOPPED),
        ("temporary", True, S.FAILED),
    ],
)
async def test_restart_policy_decides_what_follows_an_exit(
    autojump_clock: trio.testing.MockClock, policy: str, error: bool, expected: S
) -> None:
    sup = nd.Supervisor("policies", backoff=no_jitter(5.0))

    @sup.service(restart=policy)
    async def subject(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await trio.sleep(1)
        if error:
            raise ValueError("crash")

    sup.add(idle_until_drained, name="keeper")  # keeps the app up while we look
    async with nd.open_supervisor(sup):
        await trio.sleep(2)
        assert sup.state_of("subject") is expected


async def test_app_ends_by_itself_when_every_service_returned() -> None:
    sup = nd.Supervisor("oneshot")

    @sup.service(restart="temporary")
    async def once(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    with trio.fail_after(5):
        async with nd.open_supervisor(sup) as running:
            await running.wait_finished()
    assert sup.exit_code == nd.EXIT_OK
    assert sup.app_state == "stopped"


async def test_service_returning_before_ready_does_not_block_start_order() -> None:
    sup = nd.Supervisor("early")

    @sup.service(restart="temporary")
    async def setup(ctx: nd.ServiceContext) -> None:
        return

    sup.add(idle_until_drained, name="main")
    with trio.fail_after(5):
        async with nd.open_supervisor(sup):
            assert sup.state_of("setup") is S.STOPPED
            assert sup.state_of("main") is S.RUNNING


async def test_every_state_change_publishes_exactly_one_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("events", backoff=no_jitter())
    crashed = False

    @sup.service
    async def once_crashing(ctx: nd.ServiceContext) -> None:
        nonlocal crashed
        ctx.ready()
        if not crashed:
            crashed = True
            raise ValueError("first run crashes")
        await ctx.wait_draining()

    async with nd.open_supervisor(sup):
        await trio.sleep(1)
    states = [(e.previous, e.state) for e in sup.events() if e.kind == "state"]
    assert states == [
        ("stopped", "starting"),
        ("starting", "running"),
        ("running", "backoff"),
        ("backoff", "starting"),
        ("starting", "running"),
        ("running", "draining"),
        ("draining", "stopped"),
    ]


async def test_last_error_is_reported_in_the_snapshot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("errors", max_restarts=0)

    @sup.service
    async def broken(ctx: nd.ServiceContext) -> None:
        raise KeyError("missing-config")

    async with nd.open_supervisor(sup) as running:
        await running.wait_finished()
    service = sup.snapshot()["services"][0]
    assert service["state"] == "failed"
    assert service["last_error"] == "KeyError: 'missing-config'"


async def test_a_supervisor_runs_only_once() -> None:
    sup = nd.Supervisor("once")

    @sup.service(restart="temporary")
    async def quick(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    async with nd.open_supervisor(sup) as running:
        await running.wait_finished()
    with pytest.raises(nd.ConfigurationError, match="only run once"):
        await sup.serve()


async def test_services_cannot_be_added_while_running() -> None:
    sup = nd.Supervisor("frozen")
    sup.add(idle_until_drained, name="a")
    async with nd.open_supervisor(sup):
        with pytest.raises(nd.ConfigurationError, match="while it runs"):
            sup.add(idle_until_drained, name="b")
