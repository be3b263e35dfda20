"""Drain, precisely: intake stops at once, jobs finish until the grace deadline, then are cut."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S
from nursery_down._signals import dispatch_signal

#: Where a service's jobs run: in tasks the service starts in a nursery of its own
#: (each job enters a shielded scope of its own), or in workers started with
#: ctx.run_workers (each job is shielded by its worker's scope).
PLACEMENTS = ["own tasks", "run_workers"]


def job_service(
    sup: nd.Supervisor,
    durations: list[float],
    *,
    name: str = "work",
    log: list[tuple[str, Any, float]] | None = None,
    placement: str = "own tasks",
    **options: Any,
) -> None:
    """A service running one concurrent job per duration, logging job starts and ends."""
    record = log if log is not None else []

    async def service(ctx: nd.ServiceContext) -> None:
        all_entered = trio.Event()
        entered = 0

        async def one(index: int, seconds: float) -> None:
            nonlocal entered
            async with ctx.job(f"job-{index}", seconds=seconds):
                record.append(("start", index, trio.current_time()))
                entered += 1
                if entered == len(durations):
                    all_entered.set()
                await trio.sleep(seconds)
            record.append(("done", index, trio.current_time()))

        pending = iter(enumerate(durations))

        async def worker() -> None:
            await one(*next(pending))

        async with trio.open_nursery() as nursery:
            if placement == "run_workers" and durations:
                nursery.start_soon(ctx.run_workers, len(durations), worker)
            else:
                for index, seconds in enumerate(durations):
                    nursery.start_soon(one, index, seconds)
            if durations:
                await all_entered.wait()  # every job is in its block before we are ready
            ctx.ready()
            await ctx.wait_draining()

    sup.add(service, name=name, **options)


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_drain_lets_jobs_finish_within_the_grace(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("grace", grace=10.0)
    log: list[tuple[str, Any, float]] = []
    job_service(sup, [3.0, 7.0], log=log, placement=placement)
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await sup.drain("work")
        assert sup.state_of("work") is S.DRAINING
        await sup.wait_state("work", S.STOPPED)
        assert trio.current_time() == 7.0
    assert [entry[0] for entry in log].count("done") == 2
    service = sup.snapshot()["services"][0]
    assert (service["completed"], service["hard_cancelled"], service["in_flight"]) == (2, 0, 0)
    assert sup.exit_code == nd.EXIT_OK


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_drain_hard_cancels_jobs_at_the_grace_deadline(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("overrun", grace=5.0)
    log: list[tuple[str, Any, float]] = []
    job_service(sup, [2.0, 100.0], log=log, placement=placement)
    async with nd.open_supervisor(sup):
        await sup.drain("work")
        await sup.wait_state("work", S.STOPPED)
        assert trio.current_time() == 5.0
    # The cut job never reaches the code after its block.
    assert [entry[:2] for entry in log if entry[0] == "done"] == [("done", 0)]
    service = sup.snapshot()["services"][0]
    assert (service["completed"], service["hard_cancelled"]) == (1, 1)
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_job_outcome_says_how_the_block_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("outcomes", grace=1.0)
    jobs: list[nd.Job] = []

    @sup.service(restart="temporary")
    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("ok") as job:
            jobs.append(job)
            assert job.outcome == "running"

        async def fail() -> None:
            async with ctx.job("bad") as job:
                jobs.append(job)
                raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await fail()
        try:
            async with ctx.job("slow") as job:
                jobs.append(job)
                await trio.sleep(100)
        finally:
            assert [j.outcome for j in jobs] == ["completed", "failed", "hard_cancelled"]

    async with nd.open_supervisor(sup):
        await sup.drain("service")
    counters = sup.snapshot()["services"][0]
    assert (counters["completed"], counters["failed"], counters["hard_cancelled"]) == (1, 1, 1)


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_extend_grace_moves_the_deadline_later(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("extend", grace=5.0)
    job_service(sup, [12.0], placement=placement)
    async with nd.open_supervisor(sup):
        await sup.drain("work")
        await trio.sleep(4)
        await sup.extend_grace(10.0, "work")
        job = sup.snapshot()["services"][0]["jobs"][0]
        assert job["time_left"] == pytest.approx(11.0)
        await sup.wait_state("work", S.STOPPED)
        assert trio.current_time() == 12.0
    assert sup.exit_code == nd.EXIT_OK


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_escalate_hard_cancels_in_flight_jobs_now(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("escalate", grace=30.0)
    job_service(sup, [50.0, 60.0], placement=placement)
    async with nd.open_supervisor(sup):
        await sup.drain("work")
        await trio.sleep(2)
        await sup.escalate("work")
        await sup.wait_state("work", S.STOPPED)
        assert trio.current_time() == 2.0
    assert sup.snapshot()["services"][0]["hard_cancelled"] == 2


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_escalate_without_a_drain_drains_with_no_grace(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("escalate-now", grace=30.0)
    job_service(sup, [50.0], placement=placement)
    async with nd.open_supervisor(sup):
        await sup.escalate()
        await sup.wait_finished()
        assert trio.current_time() == 0.0
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


@pytest.mark.parametrize("every_service", [False, True], ids=["one service", "every service"])
async def test_escalate_during_a_restart_cuts_the_jobs_and_the_restart_goes_on(
    autojump_clock: trio.testing.MockClock, every_service: bool
) -> None:
    sup = nd.Supervisor("hurried", grace=30.0)
    job_service(sup, [50.0])
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await (sup.restart() if every_service else sup.restart("work"))
        await sup.wait_state("work", S.DRAINING)
        await trio.sleep(1)
        await sup.escalate("work")
        with trio.fail_after(10):  # not started again: a hang of the mock clock
            await sup.wait_state("work", S.RUNNING)
        assert trio.current_time() == 2.0
        service = sup.snapshot()["services"][0]
        assert (service["restarts"], service["hard_cancelled"]) == (1, 1)
        await sup.drain()
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_job_is_shielded_from_a_crashing_sibling_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("shield", max_restarts=0)
    finished: list[float] = []

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        async def worker() -> None:
            async with ctx.job("important"):
                await trio.sleep(5)
            finished.append(trio.current_time())

        async def crasher() -> None:
            await trio.sleep(1)
            raise ValueError("sibling crashed")

        ctx.ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            nursery.start_soon(crasher)

    async with nd.open_supervisor(sup):
        await sup.wait_state("service", S.FAILED)
    assert finished == [5.0]
    assert sup.snapshot()["services"][0]["completed"] == 1


async def test_intake_stops_at_once_and_leaves_items_in_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("intake")
    send, receive = trio.open_memory_channel[int](10)
    taken: list[int] = []

    @sup.service
    async def consumer(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async for item in ctx.intake(receive):
            async with ctx.job(item):
                taken.append(item)
                await trio.sleep(1)

    async with nd.open_supervisor(sup):
        await send.send(1)
        await trio.sleep(0.5)
        for item in (2, 3, 4):
            send.send_nowait(item)
        await sup.drain("consumer")
        await sup.wait_state("consumer", S.STOPPED)
        assert trio.current_time() == 1.0
    assert taken == [1]
    assert [receive.receive_nowait() for _ in range(3)] == [2, 3, 4]


async def test_intake_wakes_a_blocked_receive_instantly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("blocked")
    _send, receive = trio.open_memory_channel[int](0)

    @sup.service
    async def consumer(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async for _item in ctx.intake(receive):
            raise AssertionError("nothing was sent")

    async with nd.open_supervisor(sup):
        await trio.sleep(3)
        await sup.drain("consumer")
        await sup.wait_state("consumer", S.STOPPED)
        assert trio.current_time() == 3.0
    # The service's clone closed; the user's channel is still open and usable.
    _send.send_nowait  # noqa: B018
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


async def test_intake_over_any_async_iterable_stops_on_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("generic")
    seen: list[int] = []

    async def ticks() -> Any:
        n = 0
        while True:
            await trio.sleep(1)
            n += 1
            yield n

    @sup.service
    async def consumer(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        source = ticks()
        async for n in ctx.intake(source):
            seen.append(n)
        await source.aclose()

    async with nd.open_supervisor(sup):
        await trio.sleep(3.5)
        await sup.drain("consumer")
        await sup.wait_state("consumer", S.STOPPED)
        assert trio.current_time() == 3.5
    assert seen == [1, 2, 3]


@pytest.mark.parametrize(
    ("with_release", "expected"),
    [
        (True, ([], ["racing"])),  # handed back to its source
        (False, (["racing"], [])),  # still runs as a job: never dropped
    ],
)
async def test_an_item_arriving_as_the_drain_begins_is_never_dropped(
    with_release: bool, expected: tuple[list[str], list[str]]
) -> None:
    sup = nd.Supervisor("late")
    send, receive = trio.open_memory_channel[str](0)
    released: list[str] = []
    started: list[str] = []

    @sup.service
    async def consumer(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async for item in ctx.intake(receive, release=released.append if with_release else None):
            async with ctx.job(item):
                started.append(item)

    with trio.fail_after(5):
        async with nd.open_supervisor(sup):
            await trio.testing.wait_all_tasks_blocked()
            # The consumer is parked in receive(): hand it an item, and drain in the
            # same instant, before it runs again.
            send.send_nowait("racing")
            await sup.drain("consumer")
            await sup.wait_state("consumer", S.STOPPED)
    assert (started, released) == expected


async def test_entering_a_job_after_the_drain_began_raises() -> None:
    sup = nd.Supervisor("late-job")
    errors: list[nd.DrainingError] = []

    @sup.service(restart="temporary")
    async def careless(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()
        try:
            async with ctx.job("too-late"):
                raise AssertionError("must not run")
        except nd.DrainingError as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with nd.open_supervisor(sup):
            pass
    assert len(errors) == 1
    assert "ctx.intake()" in str(errors[0])


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_whole_app_drain_follows_stop_order_with_one_deadline(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("app", grace=10.0)
    job_service(sup, [4.0], name="db", placement=placement)
    job_service(sup, [6.0], name="workers", after=["db"], placement=placement)
    job_service(sup, [100.0], name="ingress", after=["workers"], placement=placement)
    async with nd.open_supervisor(sup):
        await sup.drain()
        assert sup.snapshot()["draining"] is True
        await sup.wait_finished()
    stops = {e.service: e.time for e in sup.events() if e.kind == "state" and e.state == "stopped"}
    assert list(stops) == ["ingress", "workers", "db"]
    services = {s["name"]: s for s in sup.snapshot()["services"]}
    # ingress hits the shared deadline at t=10; workers and db had finished their jobs.
    assert services["ingress"]["hard_cancelled"] == 1
    assert services["workers"]["completed"] == 1
    assert services["db"]["completed"] == 1
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_control_methods_are_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("idem", grace=5.0)
    job_service(sup, [3.0])
    async with nd.open_supervisor(sup):
        await sup.start("work")  # already running: nothing happens
        await sup.drain("work")
        await sup.drain("work", grace=100.0)  # already draining: deadline unchanged
        assert sup.snapshot()["services"][0]["jobs"][0]["time_left"] == pytest.approx(5.0)
        await sup.wait_state("work", S.STOPPED)
        await sup.drain("work")  # already stopped
        await sup.escalate("work")
        assert sup.state_of("work") is S.STOPPED
        await sup.start("work")
        await sup.start("work")
        await sup.wait_state("work", S.RUNNING)
        await sup.restart("work")
        await sup.restart("work")
        await sup.wait_state("work", S.DRAINING)
        await sup.wait_state("work", S.RUNNING)
    starts = [e for e in sup.events() if e.kind == "state" and e.state == "starting"]
    assert len(starts) == 3


async def test_restart_drains_then_starts_again(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("restart", grace=10.0)
    runs: list[float] = []

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        runs.append(trio.current_time())
        ctx.ready()
        async with ctx.job("in-flight"):
            await trio.sleep(4)
        await ctx.wait_draining()

    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await sup.restart("service")
        await sup.wait_state("service", S.DRAINING)
        await sup.wait_state("service", S.RUNNING)
    assert runs == [0.0, 4.0]
    assert sup.snapshot()["services"][0]["restarts"] == 1


async def test_start_refuses_a_draining_service(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("refuse", grace=10.0)
    job_service(sup, [5.0])
    async with nd.open_supervisor(sup):
        await sup.drain("work")
        with pytest.raises(nd.InvalidTransitionError, match="use restart"):
            await sup.start("work")


async def test_extend_grace_refuses_when_nothing_is_draining() -> None:
    sup = nd.Supervisor("nothing")
    job_service(sup, [])
    async with nd.open_supervisor(sup):
        with pytest.raises(nd.InvalidTransitionError, match="not draining"):
            await sup.extend_grace(5.0, "work")
        with pytest.raises(nd.InvalidTransitionError, match="nothing is draining"):
            await sup.extend_grace(5.0)
        with pytest.raises(nd.ConfigurationError, match="seconds"):
            await sup.extend_grace(-1.0)


@pytest.mark.parametrize("method", ["drain", "start", "restart", "escalate"])
async def test_control_methods_name_unknown_services_clearly(method: str) -> None:
    sup = nd.Supervisor("unknown")
    job_service(sup, [])
    async with nd.open_supervisor(sup):
        with pytest.raises(nd.UnknownServiceError, match=r"unknown service 'nope'.*'work'"):
            await getattr(sup, method)("nope")


@pytest.mark.parametrize("method", ["drain", "start", "restart", "escalate"])
async def test_service_control_needs_a_running_supervisor(method: str) -> None:
    sup = nd.Supervisor("idle")
    job_service(sup, [])
    with pytest.raises(nd.InvalidTransitionError, match="not running yet"):
        await getattr(sup, method)("work")


@pytest.mark.parametrize("method", ["drain", "escalate"])
async def test_a_whole_app_drain_before_running_stops_it_at_once(method: str) -> None:
    # What a SIGTERM during the program's own start-up does: nothing starts, exit 0.
    sup = nd.Supervisor("early")
    job_service(sup, [])
    await getattr(sup, method)()
    assert sup.draining
    with trio.fail_after(5):
        async with nd.open_supervisor(sup):
            pass
    assert sup.exit_code == nd.EXIT_OK
    assert sup.state_of("work") is nd.ServiceState.STOPPED
    assert not [e for e in sup.events() if e.kind == "state"]


async def test_control_methods_refuse_a_stopped_supervisor() -> None:
    sup = nd.Supervisor("done")
    job_service(sup, [])
    async with nd.open_supervisor(sup):
        pass
    with pytest.raises(nd.InvalidTransitionError, match="has stopped"):
        await sup.drain()


async def test_drain_refuses_a_negative_grace() -> None:
    sup = nd.Supervisor("negative")
    job_service(sup, [])
    async with nd.open_supervisor(sup):
        with pytest.raises(nd.ConfigurationError, match="grace"):
            await sup.drain("work", grace=-1)


async def test_drain_during_backoff_stops_the_service(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("backoff-drain", backoff=nd.Backoff(initial=60.0, maximum=60.0, jitter=0.0))

    @sup.service
    async def crasher(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        raise ValueError("crash")

    async with nd.open_supervisor(sup):
        await sup.wait_state("crasher", S.BACKOFF)
        await sup.drain("crasher")
        await sup.wait_state("crasher", S.STOPPED)
        assert trio.current_time() == 0.0


async def test_snapshot_matches_the_documented_schema(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("orders", grace=30.0)
    job_service(sup, [10.0, 20.0, 30.0], name="consumer")
    async with nd.open_supervisor(sup):
        await trio.sleep(1.5)
        await sup.drain("consumer")
        snap = sup.snapshot(max_jobs=2)
        assert {
            "app",
            "pid",
            "state",
            "draining",
            "grace_deadline",
            "exit_code",
            "services",
        } <= set(snap)
        assert (snap["app"], snap["state"], snap["draining"]) == ("orders", "running", False)
        service = snap["services"][0]
        assert {
            "name",
            "state",
            "in_flight",
            "completed",
            "failed",
            "hard_cancelled",
            "restarts",
            "health",
            "since",
            "jobs",
        } <= set(service)
        assert (service["state"], service["in_flight"], service["health"]) == ("draining", 3, "ok")
        assert service["oldest_job_age"] == pytest.approx(1.5)
        assert service["jobs_hidden"] == 1
        assert {job["key"] for job in service["jobs"]} < {"job-0", "job-1", "job-2"}
        job = service["jobs"][0]
        assert job["age"] == pytest.approx(1.5)
        assert job["time_left"] == pytest.approx(30.0)
        assert isinstance(job["deadline"], float)
        assert job["info"] == {"seconds": float(job["key"][-1]) * 10 + 10}


async def test_subscribers_receive_events_and_end_with_the_supervisor() -> None:
    sup = nd.Supervisor("subscribe")
    job_service(sup, [])
    received: list[str] = []

    async def listen(subscription: nd.Subscription) -> None:
        with subscription:
            async for event in subscription:
                received.append(f"{event.kind}:{event.state}")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, nd.open_supervisor(sup):
            nursery.start_soon(listen, sup.subscribe())
            await trio.testing.wait_all_tasks_blocked()
            await sup.drain("work", actor="test")
            await sup.wait_state("work", S.STOPPED)
    assert received == [
        "action:None",
        "state:draining",
        "state:stopped",
        "action:None",  # leaving the block drains the whole app
        "app:draining",
        "app:stopped",
    ]


async def test_first_term_drains_second_escalates(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("signals", grace=30.0)
    job_service(sup, [100.0])
    async with nd.open_supervisor(sup):
        dispatch_signal(sup, signal.SIGTERM)
        await trio.sleep(1)
        assert sup.draining
        dispatch_signal(sup, signal.SIGINT)
        await sup.wait_finished()
        assert trio.current_time() == 1.0
    kinds = [(e.kind, e.message) for e in sup.events() if e.kind in ("signal", "action")]
    assert kinds == [
        ("signal", "received SIGTERM"),
        ("action", "drain the whole app (by signal SIGTERM)"),
        ("signal", "received SIGINT"),
        ("action", "escalate the whole app (by signal SIGINT)"),
    ]
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_sighup_stops_every_service_in_stop_order_then_starts_them_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("hup", grace=30.0)
    job_service(sup, [2.0], name="first")
    job_service(sup, [5.0], name="second")
    async with nd.open_supervisor(sup):
        dispatch_signal(sup, signal.SIGHUP)
        dispatch_signal(sup, signal.SIGHUP)  # a rolling restart is already under way
        await trio.sleep(10)
        assert sup.app_state == "running"
    events = [(e.service, e.state) for e in sup.events() if e.kind == "state"]
    rolling = events[4:12]
    # "second" may use "first": it stops before "first" and starts after it.
    assert rolling == [
        ("second", "draining"),
        ("second", "stopped"),
        ("first", "draining"),
        ("first", "stopped"),
        ("first", "starting"),
        ("first", "running"),
        ("second", "starting"),
        ("second", "running"),
    ]
    assert [s["restarts"] for s in sup.snapshot()["services"]] == [1, 1]


@pytest.mark.parametrize("placement", PLACEMENTS)
async def test_leaving_open_supervisor_with_an_error_hard_cancels_jobs(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("error-exit", grace=30.0)
    job_service(sup, [100.0], placement=placement)

    async def embedding_program() -> None:
        async with nd.open_supervisor(sup):
            await trio.sleep(1)
            raise LookupError("the embedding program failed")

    with pytest.raises(ExceptionGroup) as info:
        await embedding_program()
    assert info.group_contains(LookupError)
    assert trio.current_time() == 1.0
    assert sup.snapshot()["services"][0]["hard_cancelled"] == 1
