"""ctx.run_workers, and jobs shielded by the scope of the task they run in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S

ServiceBody = Callable[[nd.ServiceContext], Awaitable[None]]


async def run_service(body: ServiceBody, *, grace: float = 30.0) -> nd.Supervisor:
    """Run *body* as the one temporary service of a supervisor until it ends."""
    sup = nd.Supervisor("workers", grace=grace)
    sup.add(body, name="service", restart="temporary")
    with trio.fail_after(1000):
        async with nd.open_supervisor(sup):
            await sup.wait_finished()
    return sup


def counts(sup: nd.Supervisor) -> tuple[int, int, int]:
    service = sup.snapshot()["services"][0]
    return service["completed"], service["failed"], service["hard_cancelled"]


async def test_run_workers_runs_every_worker_at_once_and_returns_when_all_have(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[tuple[str, float]] = []

    async def body(ctx: nd.ServiceContext) -> None:
        durations = iter([3.0, 1.0, 2.0])

        async def worker(label: str) -> None:
            seconds = next(durations)
            async with ctx.job(seconds):
                await trio.sleep(seconds)
            finished.append((label, trio.current_time()))

        ctx.ready()
        await ctx.run_workers(3, worker, "w")
        finished.append(("all", trio.current_time()))

    sup = await run_service(body)
    assert finished == [("w", 1.0), ("w", 2.0), ("w", 3.0), ("all", 3.0)]
    assert counts(sup) == (3, 0, 0)


@pytest.mark.parametrize(
    ("count", "worker", "message"),
    [
        (0, "async", "whole number >= 1 of workers, got 0"),
        (True, "async", "whole number >= 1 of workers, got True"),
        (2.5, "async", "whole number >= 1 of workers, got 2.5"),
        (2, "plain", "must be an async function"),
    ],
)
async def test_run_workers_refuses_bad_input(count: Any, worker: str, message: str) -> None:
    errors: list[BaseException] = []

    async def async_worker() -> None:
        pass

    def plain_worker() -> None:
        pass

    chosen: Any = async_worker if worker == "async" else plain_worker

    async def body(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        try:
            await ctx.run_workers(count, chosen)
        except nd.ConfigurationError as error:
            errors.append(error)

    await run_service(body)
    assert len(errors) == 1
    assert message in str(errors[0])


async def test_a_crashing_worker_cancels_idle_workers_at_once_and_busy_ones_after_their_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, float]] = []
    sup = nd.Supervisor("crash", max_restarts=0)

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        send, receive = trio.open_memory_channel[int](0)  # nothing ever arrives
        roles = iter(["busy", "crasher", "idle"])

        async def worker() -> None:
            role = next(roles)
            try:
                if role == "busy":
                    async with ctx.job("important"):
                        await trio.sleep(5)
                    events.append(("job done", trio.current_time()))
                    await trio.sleep(0)  # the first checkpoint after the job
                    events.append(("busy worker went on", trio.current_time()))
                elif role == "crasher":
                    await trio.sleep(1)
                    raise ValueError("worker crashed")
                else:
                    async for item in ctx.intake(receive):
                        async with ctx.job(item):
                            pass
            except trio.Cancelled:
                events.append((f"{role} worker cancelled", trio.current_time()))
                raise

        ctx.ready()
        async with send:
            await ctx.run_workers(3, worker)

    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.wait_state("service", S.FAILED)
    assert events == [
        ("idle worker cancelled", 1.0),
        ("job done", 5.0),
        ("busy worker cancelled", 5.0),
    ]
    assert "worker crashed" in sup.snapshot()["services"][0]["last_error"]
    assert counts(sup) == (1, 0, 0)


async def test_an_outside_cancellation_reaches_idle_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("outside")
    cancelled: list[float] = []

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        send, receive = trio.open_memory_channel[int](0)  # nothing ever arrives

        async def worker() -> None:
            try:
                async for item in ctx.intake(receive):
                    async with ctx.job(item):
                        pass
            finally:
                cancelled.append(trio.current_time())

        ctx.ready()
        async with send:
            await ctx.run_workers(4, worker)

    with trio.fail_after(100):
        with trio.move_on_after(2):
            async with nd.open_supervisor(sup):
                await trio.sleep_forever()
    assert cancelled == [2.0] * 4


async def test_workers_started_in_a_cancelled_scope_end_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The workers may start before or after the task that lifts their shields sees
    # the cancellation: either way none of them may stay blocked.
    ended: list[float] = []

    async def body(ctx: nd.ServiceContext) -> None:
        send, receive = trio.open_memory_channel[int](0)

        async def worker() -> None:
            try:
                async for _ in ctx.intake(receive):
                    pass
            finally:
                ended.append(trio.current_time())

        ctx.ready()
        async with send:
            with trio.CancelScope() as scope:
                scope.cancel()
                await ctx.run_workers(3, worker)

    for _ in range(10):  # trio varies the order in which new tasks first run
        ended.clear()
        start = trio.current_time()
        await run_service(body)
        assert ended == [start] * 3


async def test_drain_ends_idle_workers_and_lets_busy_ones_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("drain", grace=10.0)
    done: list[tuple[int, float]] = []

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        send, receive = trio.open_memory_channel[int](0)

        async def worker() -> None:
            async for seconds in ctx.intake(receive):
                async with ctx.job(seconds):
                    await trio.sleep(seconds)
                done.append((seconds, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.run_workers, 5, worker)
            ctx.ready()
            async with send:
                for seconds in (4, 6):
                    await send.send(seconds)
                await ctx.wait_draining()

    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await trio.sleep(1)
            await sup.drain()
            await sup.wait_finished()
            assert trio.current_time() == 6.0
    assert done == [(4, 4.0), (6, 6.0)]
    assert counts(sup) == (2, 0, 0)


@pytest.mark.parametrize("placement", ["service task", "worker"])
async def test_a_job_inside_a_nursery_or_timeout_of_its_task_is_still_shielded(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    # The task's own scope cannot shield such a job (the nursery and the timeout
    # sit between them), so it takes a scope of its own, as in any other task.
    finished: list[tuple[str, float]] = []

    async def jobs(ctx: nd.ServiceContext) -> None:
        with trio.move_on_after(1):
            async with ctx.job("under a timeout"):
                await trio.sleep(3)
            finished.append(("under a timeout", trio.current_time()))

        async def crasher() -> None:
            await trio.sleep(1)
            raise ValueError("sibling crashed")

        with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="sibling crashed")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(crasher)
                async with ctx.job("beside a crashing sibling"):
                    await trio.sleep(5)
                finished.append(("beside a crashing sibling", trio.current_time()))

    async def body(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        if placement == "worker":
            await ctx.run_workers(1, jobs, ctx)
        else:
            await jobs(ctx)

    sup = await run_service(body)
    assert finished == [("under a timeout", 3.0), ("beside a crashing sibling", 8.0)]
    assert counts(sup) == (2, 0, 0)


@pytest.mark.parametrize("placement", ["service task", "worker"])
async def test_nested_jobs_are_each_shielded_and_counted(
    autojump_clock: trio.testing.MockClock, placement: str
) -> None:
    outcomes: list[str] = []

    async def jobs(ctx: nd.ServiceContext) -> None:
        async with ctx.job("outer") as outer, ctx.job("inner") as inner:
            assert ctx.deadline == inner.deadline == outer.deadline
            assert len(ctx._counters.in_flight) == 2
            await trio.sleep(20)  # beyond the grace: both are cut
        outcomes.append("unreachable")

    async def body(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        try:
            if placement == "worker":
                await ctx.run_workers(1, jobs, ctx)
            else:
                await jobs(ctx)
        finally:
            outcomes.append(f"service ended at {trio.current_time():g}")

    sup = nd.Supervisor("nested", grace=5.0)
    sup.add(body, name="service", restart="temporary")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await trio.sleep(1)
            await sup.drain()
            await sup.wait_finished()
    assert outcomes == ["service ended at 6"]
    assert counts(sup) == (0, 0, 2)
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_the_outer_of_nested_jobs_stays_shielded_after_the_inner_one_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[float] = []
    sup = nd.Supervisor("nested-crash", max_restarts=0)

    @sup.service
    async def service(ctx: nd.ServiceContext) -> None:
        roles = iter(["nested", "crasher"])

        async def worker() -> None:
            if next(roles) == "crasher":
                await trio.sleep(2)
                raise ValueError("worker crashed")
            async with ctx.job("outer"):
                async with ctx.job("inner"):
                    await trio.sleep(1)
                await trio.sleep(5)  # the crash comes in here
            finished.append(trio.current_time())

        ctx.ready()
        await ctx.run_workers(2, worker)

    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.wait_state("service", S.FAILED)
    assert finished == [6.0]
    assert counts(sup) == (2, 0, 0)


@pytest.mark.parametrize(
    ("placement", "job_ends_at"),
    [("worker", 1.0), ("service task", 1.0), ("task of its own", 5.0)],
)
async def test_a_scope_without_a_deadline_cancelled_by_hand_reaches_a_job_directly_in_its_task(
    autojump_clock: trio.testing.MockClock, placement: str, job_ends_at: float
) -> None:
    # A worker (or the service function) lends its own scope to a job block entered
    # directly in it, so a plain scope opened around the block and cancelled by hand
    # reaches the job; a job in a task of one's own enters a shielded scope of its own.
    scopes: list[trio.CancelScope] = []
    seen: list[tuple[str, float]] = []

    async def jobs(ctx: nd.ServiceContext) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            try:
                async with ctx.job("cancellable"):
                    await trio.sleep(5)
            finally:
                seen.append(("job ended", trio.current_time()))
        seen.append(("went on", trio.current_time()))

    sup = nd.Supervisor("by-hand", grace=30.0)

    @sup.service(restart="temporary")
    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        if placement == "worker":
            await ctx.run_workers(1, jobs, ctx)
        elif placement == "service task":
            await jobs(ctx)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(jobs, ctx)

    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await trio.sleep(1)
            (scope,) = scopes
            scope.cancel()
            await sup.wait_finished()
    assert seen == [("job ended", job_ends_at), ("went on", job_ends_at)]
    assert counts(sup)[0] == (1 if job_ends_at == 5.0 else 0)
