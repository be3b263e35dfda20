"""The drain promise at the edges: start-up, hard crashes, cut work, no-op drains, stray jobs."""

from __future__ import annotations

import math
import signal
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S
from nursery_down._signals import dispatch_signal

ServiceFunction = Callable[[nd.ServiceContext], Awaitable[None]]


def gated_service(gate: trio.Event, runs: list[str], name: str) -> ServiceFunction:
    """A service that becomes ready when *gate* is set, and logs each run's start."""

    async def service(ctx: nd.ServiceContext) -> None:
        runs.append(name)
        await gate.wait()
        ctx.ready()
        await ctx.wait_draining()

    return service


async def start_serving(nursery: trio.Nursery, sup: nd.Supervisor) -> None:
    """Run *sup* in *nursery* without waiting for start-up, as the dashboard sees it."""
    nursery.start_soon(sup.serve)
    await trio.testing.wait_all_tasks_blocked()


# -- control actions during start-up -------------------------------------------------------


@pytest.mark.parametrize("action", ["start", "restart"])
async def test_a_service_action_during_start_up_is_refused_and_start_up_holds(
    autojump_clock: trio.testing.MockClock, action: str
) -> None:
    sup = nd.Supervisor("early")
    gate = trio.Event()
    runs: list[str] = []
    sup.add(gated_service(gate, runs, "db"), name="db")
    sup.add(gated_service(trio.Event(), runs, "api"), name="api", after=["db"])
    async with trio.open_nursery() as nursery:
        await start_serving(nursery, sup)
        assert sup.app_state == "starting"
        assert sup.state_of("api") is S.STOPPED  # start-up has not reached it
        with pytest.raises(nd.InvalidTransitionError, match="while the app is starting"):
            await getattr(sup, action)("api")
        # It did not run before the service it starts after.
        assert runs == ["db"]
        gate.set()
        await sup.wait_state("api", S.STARTING)
        await trio.testing.wait_all_tasks_blocked()
        assert runs == ["db", "api"]  # one run each: start-up launched it once
        await sup.escalate()


async def test_a_whole_app_restart_during_start_up_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("early-hup")
    gate = trio.Event()
    runs: list[str] = []
    sup.add(gated_service(gate, runs, "db"), name="db")
    ready = trio.Event()
    ready.set()
    sup.add(gated_service(ready, runs, "api"), name="api")
    async with trio.open_nursery() as nursery:
        await start_serving(nursery, sup)
        dispatch_signal(sup, signal.SIGHUP)
        await sup.restart()  # asked twice: one restart
        await trio.sleep(5)
        assert runs == ["db"]
        gate.set()
        await sup.wait_app_state("running")
        with trio.fail_after(10):
            while [e for e in sup.events() if e.message == "every service restarted"] == []:
                await trio.sleep(0.1)
        assert runs == ["db", "api", "db", "api"]
        await sup.escalate()


async def test_sigterm_before_the_services_run_is_honoured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("early-term")
    runs: list[str] = []
    sup.add(gated_service(trio.Event(), runs, "db"), name="db")
    dispatch_signal(sup, signal.SIGTERM)  # the program has not run the supervisor yet
    with trio.fail_after(1):
        await sup.serve()
    assert runs == []
    assert sup.exit_code == nd.EXIT_OK


async def test_sigterm_while_a_service_starts_stops_it_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A service that is not ready took no work: its start is called off, not waited out.
    sup = nd.Supervisor("starting-term", grace=30.0)
    runs: list[str] = []
    sup.add(gated_service(trio.Event(), runs, "db"), name="db")
    sup.add(gated_service(trio.Event(), runs, "api"), name="api")
    async with trio.open_nursery() as nursery:
        await start_serving(nursery, sup)
        dispatch_signal(sup, signal.SIGTERM)
        await sup.wait_finished()
    assert trio.current_time() == 0.0
    assert runs == ["db"]
    assert sup.exit_code == nd.EXIT_OK


# -- whatever ends the supervisor, no job outlives the grace ------------------------------


@pytest.mark.parametrize("fatal", [SystemExit(0), KeyboardInterrupt(), SystemExit(4)])
async def test_a_fatal_exception_in_a_service_gives_jobs_at_most_the_grace(
    autojump_clock: trio.testing.MockClock, fatal: BaseException
) -> None:
    sup = nd.Supervisor("fatal", grace=30.0)
    outcomes: list[str] = []

    async def long_job(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("hour-long") as job:
            try:
                await trio.sleep(3600)
            finally:
                outcomes.append(f"{job.key} ended at {trio.current_time():g}")

    async def fatal_service(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await trio.sleep(1)
        raise fatal

    sup.add(long_job, name="worker")
    sup.add(fatal_service, name="fatal")
    with pytest.raises(BaseExceptionGroup) as info:
        async with nd.open_supervisor(sup):
            await trio.sleep_forever()
    assert info.group_contains(type(fatal))
    assert outcomes == ["hour-long ended at 31"]
    # SystemExit(4) asks for exit code 4, as the process then exits with.
    assert sup.exit_code == (4 if repr(fatal) == "SystemExit(4)" else nd.EXIT_FAILED)
    assert sup.snapshot()["services"][0]["hard_cancelled"] == 1


async def test_an_outside_cancellation_gives_jobs_at_most_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("cancelled", grace=20.0)

    async def long_job(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("hour-long"):
            await trio.sleep(3600)

    sup.add(long_job, name="worker")
    with trio.move_on_after(5):
        await sup.serve()
    assert trio.current_time() == 25.0
    assert sup.snapshot()["services"][0]["hard_cancelled"] == 1


# -- exit code 3 whenever the deadline cut anything -------------------------------------


@pytest.mark.parametrize("placement", ["service", "run_workers", "own nursery"])
async def test_work_cut_outside_any_job_exits_3(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    sup = nd.Supervisor("stubborn", grace=5.0)

    async def ignores_the_drain() -> None:
        await trio.sleep(3600)  # no ctx.job(): the drain cannot wait for it, only cut it

    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        if placement == "service":
            await ignores_the_drain()
        elif placement == "run_workers":
            await ctx.run_workers(2, ignores_the_drain)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ignores_the_drain)

    sup.add(service, name="stubborn")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
    assert trio.current_time() == 6.0
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED
    service_snapshot = sup.snapshot()["services"][0]
    assert service_snapshot["cut"] == 1
    assert service_snapshot["hard_cancelled"] == 0


# -- a drain of a service that is not running changes nothing ------------------------------


@pytest.mark.parametrize("action", ["drain", "escalate"])
async def test_draining_a_stopped_service_does_not_keep_the_program_up(
    autojump_clock: trio.testing.MockClock, action: str
) -> None:
    sup = nd.Supervisor("no-op")

    async def one_shot(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    async def ten_seconds(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await trio.sleep(10)

    sup.add(one_shot, name="one-shot", restart="transient")
    sup.add(ten_seconds, name="ten-seconds", restart="transient")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.serve)
        await sup.wait_app_state("running")
        assert sup.state_of("one-shot") is S.STOPPED
        await getattr(sup, action)("one-shot")
        assert sup.state_of("one-shot") is S.STOPPED
        with trio.fail_after(20):
            await sup.wait_finished()
    assert trio.current_time() == 10.0
    assert sup.exit_code == nd.EXIT_OK


# -- a job in a task the program owns -----------------------------------------------------


async def test_a_job_outside_the_service_is_cut_alone_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("handler", grace=5.0)
    contexts: list[nd.ServiceContext] = []
    after_block: list[str] = []

    async def api(ctx: nd.ServiceContext) -> None:
        contexts.append(ctx)
        ctx.ready()
        await ctx.wait_draining()

    async def request_handler(ctx: nd.ServiceContext) -> None:
        # Runs in the program's own nursery, not under the service.
        async with ctx.job("request-1") as job:
            await trio.sleep(3600)
        after_block.append(job.outcome)

    sup.add(api, name="api")
    async with trio.open_nursery() as program:
        async with nd.open_supervisor(sup):
            program.start_soon(request_handler, contexts[0])
            await trio.testing.wait_all_tasks_blocked()
            await sup.drain()
            await sup.wait_finished()
            # The service's run ended only when its job did.
            assert trio.current_time() == 5.0
        program.start_soon(trio.sleep, 0)  # the program's nursery still takes work
    assert after_block == ["hard_cancelled"]
    service_snapshot = sup.snapshot()["services"][0]
    assert service_snapshot["hard_cancelled"] == 1
    assert service_snapshot["in_flight"] == 0
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


# -- a control call that is cancelled did nothing -----------------------------------------


@pytest.mark.parametrize("action", ["drain", "escalate", "restart"])
async def test_a_cancelled_control_call_does_not_act(
    autojump_clock: trio.testing.MockClock, action: str
) -> None:
    sup = nd.Supervisor("cancelled-call")
    sup.add(gated_service(trio.Event(), [], "db"), name="db")
    ready = trio.Event()
    ready.set()
    sup.add(gated_service(ready, [], "api"), name="api")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.serve)
        await trio.testing.wait_all_tasks_blocked()
        events_before = len(sup.events())
        with trio.CancelScope() as scope:
            scope.cancel()
            await getattr(sup, action)()
        assert len(sup.events()) == events_before
        assert sup.app_state == "starting"
        await sup.escalate()


async def test_a_control_call_that_acted_returns_even_if_cancelled_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("acted")
    ready = trio.Event()
    ready.set()
    sup.add(gated_service(ready, [], "db"), name="db")
    async with nd.open_supervisor(sup):
        with trio.CancelScope() as scope:

            async def cancel_soon() -> None:
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_soon)
                await sup.drain("db")  # acts, then cannot be cut
                assert sup.state_of("db") in (S.DRAINING, S.STOPPED)


# -- found by the lifecycle state machine ----------------------------------------------


@pytest.mark.parametrize("fatal", [SystemExit(0), KeyboardInterrupt()])
async def test_a_fatal_exception_from_the_last_running_service_exits_1(
    autojump_clock: trio.testing.MockClock, fatal: BaseException
) -> None:
    sup = nd.Supervisor("last")

    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await trio.sleep(1)
        raise fatal

    sup.add(service, name="only")
    with pytest.raises(BaseExceptionGroup) as info:
        await sup.serve()
    assert info.group_contains(type(fatal))
    assert sup.exit_code == nd.EXIT_FAILED  # it is 0: "stopped, exit code 0"


async def test_sighup_does_not_stop_a_service_while_a_later_one_still_drains(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("hup", grace=30.0)
    log: list[str] = []

    async def db(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()
        log.append(f"db stopped at {trio.current_time():g}")

    async def api(ctx: nd.ServiceContext) -> None:  # starts after db and uses it
        ctx.ready()
        async with ctx.job("long"):
            await trio.sleep(10)
            log.append(f"api job done at {trio.current_time():g}")

    sup.add(db, name="db")
    sup.add(api, name="api", after=["db"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.serve)
        await sup.wait_app_state("running")
        sup.drain_nowait("api")  # the operator drains api: its job runs on for 10 s
        dispatch_signal(sup, signal.SIGHUP)  # restart every service
        await trio.sleep(20)
        sup.escalate_nowait()
    # db must stop only after api (which may still be using it) stopped.
    assert log[:2] == ["api job done at 10", "db stopped at 10"], log


# Which of two tasks woken by the same transition runs first decides the outcome (trio
# shuffles them), so each of these runs several times.
ATTEMPTS = range(12)


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_whole_app_drain_during_start_up_never_starts_a_later_service(
    autojump_clock: trio.testing.MockClock, attempt: int
) -> None:
    sup = nd.Supervisor("race")
    runs: list[str] = []

    async def db(ctx: nd.ServiceContext) -> None:
        runs.append("db")
        await ctx.wait_draining()  # never ready: start-up waits on it

    async def api(ctx: nd.ServiceContext) -> None:
        runs.append("api")
        ctx.ready()
        await trio.sleep_forever()

    sup.add(db, name="db")
    sup.add(api, name="api")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.serve)
            await trio.testing.wait_all_tasks_blocked()
            assert sup.app_state == "starting"
            sup.drain_nowait()
            await sup.wait_finished()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # would otherwise hang: serve() never returns
    assert runs == ["db"], f"attempt {attempt}: app {sup.app_state}, runs {runs}"


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_a_fatal_exception_during_a_sighup_restart_gives_jobs_at_most_the_grace(
    autojump_clock: trio.testing.MockClock, attempt: int
) -> None:
    sup = nd.Supervisor("teardown", grace=5.0)
    send, receive = trio.open_memory_channel[float](math.inf)
    send.send_nowait(1.0)  # in flight when the restart of every service drains it
    send.send_nowait(3600.0)  # must never start: the process is exiting
    runs: list[float] = []

    async def api(ctx: nd.ServiceContext) -> None:
        runs.append(trio.current_time())
        ctx.ready()

        async def worker() -> None:
            async for seconds in ctx.intake(receive):
                async with ctx.job(seconds):
                    await trio.sleep(seconds)

        async with trio.open_nursery() as nursery:
            if len(runs) == 1:

                async def exit_on_drain() -> None:
                    await ctx.wait_draining()
                    raise SystemExit(0)  # e.g. sys.exit() in a task of the service

                nursery.start_soon(exit_on_drain)
            nursery.start_soon(ctx.run_workers, 1, worker)

    sup.add(api, name="api")

    async def serve_and_restart_every_service() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.serve)
            dispatch_signal(sup, signal.SIGHUP)

    with pytest.raises(BaseExceptionGroup) as info:
        await serve_and_restart_every_service()
    assert info.group_contains(SystemExit)
    # The SystemExit left the service at 1.0: nothing may start again, and nothing
    # may run past 1.0 + grace.
    assert (len(runs), trio.current_time()) == (1, 1.0), attempt


async def test_a_drain_asked_for_during_a_restart_keeps_the_service_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("restart-then-drain", grace=30.0)
    runs: list[float] = []

    async def api(ctx: nd.ServiceContext) -> None:
        runs.append(trio.current_time())
        ctx.ready()
        async with ctx.job("long"):  # the restart's drain waits for it
            await trio.sleep(10)
        await ctx.wait_draining()

    async def other(ctx: nd.ServiceContext) -> None:  # keeps the app up
        ctx.ready()
        await ctx.wait_draining()

    sup.add(api, name="api")
    sup.add(other, name="other")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.serve)
        await sup.wait_app_state("running")
        await sup.restart("api")  # drain, then start again
        await trio.sleep(1)
        await sup.drain("api")  # the operator changes their mind: stop it
        await trio.sleep(20)
        state = sup.state_of("api")
        await sup.escalate()
    assert (runs, state) == ([0.0], S.STOPPED), (runs, state)
