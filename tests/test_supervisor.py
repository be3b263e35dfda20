"""Lifecycle rules of the Supervisor: order, restarts, backoff, intensity, isolation."""

from __future__ import annotations

import itertools
import math

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


def crashing_at_once(sup: nd.Supervisor) -> list[float]:
    """Add ``flaky``, a service that crashes as soon as it is ready; the trio times of
    its starts, filled in as it runs."""
    starts: list[float] = []

    @sup.service
    async def flaky(ctx: nd.ServiceContext) -> None:
        starts.append(trio.current_time())
        ctx.ready()
        raise ValueError("boom")

    return starts


async def test_by_default_a_crashing_service_restarts_five_times_backing_off_from_0_1_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("defaults", seed=3)
    starts = crashing_at_once(sup)
    with trio.fail_after(100):
        async with nd.open_supervisor(sup) as running:
            await sup.wait_state("flaky", S.FAILED)
            await running.wait_finished()
    # 0.1, 0.2, 0.4, 0.8, 1.6 s between the six runs, each within 10 % jitter.
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 5
    for gap, base in zip(gaps, [0.1, 0.2, 0.4, 0.8, 1.6], strict=True):
        assert base * 0.9 <= gap <= base * 1.1
    assert sup.snapshot()["services"][0]["restarts"] == 5
    assert sup.exit_code == nd.EXIT_FAILED


async def test_by_default_the_backoff_between_restarts_stops_growing_at_30_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("maximum", max_restarts=12, within=10_000.0, seed=5)
    starts = crashing_at_once(sup)
    with trio.fail_after(1000):
        async with nd.open_supervisor(sup):
            await sup.wait_state("flaky", S.FAILED)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 12
    assert 25.6 * 0.9 <= gaps[8] <= 25.6 * 1.1  # the ninth restart: 0.1 * 2 ** 8
    for gap in gaps[9:]:  # 0.1 * 2 ** 9 = 51.2, capped
        assert 30.0 * 0.9 <= gap <= 30.0 * 1.1


@pytest.mark.parametrize(("run_seconds", "fails"), [(11.0, True), (13.0, False)])
async def test_by_default_only_restarts_within_60_s_count_towards_the_limit_of_5(
    autojump_clock: trio.testing.MockClock, run_seconds: float, fails: bool
) -> None:
    # Crashing every 11 s (plus the backoff), the sixth crash comes within 60 s of the
    # five restarts before it; every 13 s, at most four restarts fit in any 60 s.
    sup = nd.Supervisor("window", seed=11)
    runs = 0
    ninth_run = trio.Event()

    @sup.service
    async def slow_crasher(ctx: nd.ServiceContext) -> None:
        nonlocal runs
        runs += 1
        if runs == 9:
            ninth_run.set()
        ctx.ready()
        await trio.sleep(run_seconds)
        raise ValueError("crash")

    sup.add(idle_until_drained, name="keeper")
    with trio.fail_after(1000):
        async with nd.open_supervisor(sup):
            if fails:
                await sup.wait_state("slow_crasher", S.FAILED)
                assert runs == 6
            else:
                await ninth_run.wait()
                assert sup.state_of("slow_crasher") is S.RUNNING


async def test_a_services_own_grace_serves_its_drain_and_a_whole_app_drain_caps_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("graces", grace=10.0)
    cut: dict[str, list[float]] = {"long": [], "short": []}

    async def holds_jobs(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        while True:
            try:
                async with ctx.job("forever"):
                    await trio.sleep_forever()
            finally:
                cut[ctx.name].append(trio.current_time())

    sup.add(holds_jobs, name="long", grace=60.0, restart="temporary")
    sup.add(holds_jobs, name="short", grace=3.0, restart="temporary")
    with trio.fail_after(1000):
        async with nd.open_supervisor(sup) as running:
            await sup.drain("long")
            await sup.wait_state("long", S.STOPPED)
            assert cut["long"] == [60.0]
            await sup.drain("short")
            await sup.wait_state("short", S.STOPPED)
            assert cut["short"] == [63.0]
            await sup.start("long")
            await sup.start("short")
            await sup.wait_state("short", S.RUNNING)
            await sup.drain()
            await running.wait_finished()
    # Stop order: short (its own 3 s), then long, cut at the app's 10 s deadline, not 60 s.
    assert cut == {"long": [60.0, 73.0], "short": [63.0, 66.0]}


async def test_ctx_deadline_is_infinite_until_a_drain_then_the_grace_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("deadline", grace=7.0)
    seen: list[float] = []

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        seen.append(ctx.deadline)
        await ctx.wait_draining()
        seen.append(ctx.deadline)

    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await trio.sleep(5.0)
            await sup.drain()
    assert seen == [math.inf, 12.0]


async def test_nowait_twins_start_restart_and_extend_grace_from_synchronous_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("nowait", grace=5.0)
    runs: list[float] = []
    ended: list[float] = []

    @sup.service(restart="temporary")
    async def worker(ctx: nd.ServiceContext) -> None:
        runs.append(trio.current_time())
        ctx.ready()
        async with ctx.job("slow"):
            await trio.sleep(20.0)
        ended.append(trio.current_time())
        await ctx.wait_draining()

    def on_signal(action: str) -> None:  # synchronous, as a signal handler is
        if action == "start":
            sup.start_nowait("worker")
        elif action == "restart":
            sup.restart_nowait("worker")
        else:
            sup.extend_grace_nowait(10.0, "worker")

    with trio.fail_after(1000):
        async with nd.open_supervisor(sup):
            await sup.drain("worker")
            await sup.wait_state("worker", S.STOPPED)
            assert trio.current_time() == 5.0  # the job was cut at the grace
            on_signal("start")
            await sup.wait_state("worker", S.RUNNING)
            assert runs == [0.0, 5.0]
            await trio.sleep(1.0)
            on_signal("restart")
            await sup.wait_state("worker", S.DRAINING)
            on_signal("extend")
            await sup.wait_state("worker", S.RUNNING)
            # Drained from 6 s with a 5 s grace extended by 10 s: cut at 21 s, then started.
            assert runs == [0.0, 5.0, 21.0]
    assert ended == []
