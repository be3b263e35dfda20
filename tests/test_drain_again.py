"""A drain asked for again, and how far a grace may be extended: the same rule everywhere.

A second drain with a shorter grace tightens the deadline, for one service as for the
whole app; a longer one never loosens it (extend_grace does). Extensions are capped,
so that a deadline stays finite.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down import ServiceState as S

#: Bounds on the mock clock: a hang ends in a failure at once.
BOUND = 1000.0
WEEK_AND_A_DAY = 8 * 86_400.0


def holding_supervisor(cut: list[float], *, pre_drain: float = 0.0) -> nd.Supervisor:
    """``worker`` holds one job until the deadline cuts it (the time goes in *cut*)."""
    sup = nd.Supervisor("again", grace=100.0, pre_drain=pre_drain)

    @sup.service
    async def worker(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        try:
            async with ctx.job("long"):
                await trio.sleep_forever()
        finally:
            cut.append(trio.current_time())

    return sup


async def drained_at(sup: nd.Supervisor, cut: list[float]) -> float:
    await sup.wait_finished()
    return cut[0]


async def test_second_whole_app_drain_with_a_shorter_grace_tightens_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cut: list[float] = []
    sup = holding_supervisor(cut)
    with trio.fail_after(BOUND):  # on the mock clock
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.serve)
            start = trio.current_time()
            await sup.drain(grace=60)
            await trio.sleep(10)
            await sup.drain(grace=20)  # now 30 s after the start: earlier than 60
            await trio.sleep(5)
            await sup.drain(grace=100)  # later than 30: changes nothing
            await sup.drain()  # the supervisor's grace, 100 s: later too
            assert await drained_at(sup, cut) - start == pytest.approx(30)
    assert sup.exit_code == 3


async def test_whole_app_and_service_drains_follow_the_same_rule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for whole_app in (False, True):
        cut: list[float] = []
        sup = holding_supervisor(cut)
        name = None if whole_app else "worker"
        with trio.fail_after(BOUND):  # on the mock clock
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.serve)
                start = trio.current_time()
                await sup.drain(name, grace=50)
                await sup.drain(name, grace=70)
                await sup.drain(name, grace=40)
                await sup.wait_state("worker", S.STOPPED)
                assert cut[0] - start == pytest.approx(40), whole_app
                if not whole_app:
                    await sup.drain()
                await sup.wait_finished()


async def test_a_shorter_drain_during_the_pre_drain_delay_counts_from_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cut: list[float] = []
    sup = holding_supervisor(cut, pre_drain=10.0)
    with trio.fail_after(BOUND):  # on the mock clock
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.serve)
            start = trio.current_time()
            await sup.drain(grace=60)  # serving until 10, then draining until 70
            await trio.sleep(4)
            await sup.drain(grace=5)  # 6 s of delay left: until 15
            assert sup.state_of("worker") is S.RUNNING  # the delay still runs
            assert await drained_at(sup, cut) - start == pytest.approx(15)


async def test_a_drain_of_a_stopped_service_changes_nothing_and_raises_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cut: list[float] = []
    sup = holding_supervisor(cut)
    with trio.fail_after(BOUND):  # on the mock clock
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.serve)
            await sup.escalate("worker")
            await sup.wait_state("worker", S.STOPPED)
            events = len(sup.events())
            await sup.drain("worker", grace=1)
            await sup.escalate("worker")
            assert sup.state_of("worker") is S.STOPPED
            assert [e.kind for e in sup.events()[events:]] == ["action", "action"]
            await sup.drain()
            await sup.wait_finished()


async def test_extend_grace_is_capped_at_a_day_per_call_and_a_week_ahead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cut: list[float] = []
    sup = holding_supervisor(cut)
    with trio.fail_after(WEEK_AND_A_DAY):  # on the mock clock
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.serve)
            start = trio.current_time()
            await sup.drain(grace=10)
            await sup.wait_state("worker", S.DRAINING)
            for seconds in (1e308, 86_401.0):
                with pytest.raises(nd.ConfigurationError, match="at most 86400 s"):
                    await sup.extend_grace(seconds)
                with pytest.raises(nd.ConfigurationError, match="at most 86400 s"):
                    await sup.extend_grace(seconds, "worker")
            for _ in range(6):
                await sup.extend_grace(86_400)
            with pytest.raises(
                nd.ConfigurationError, match=r"a week\) from now; at most \d+ s more"
            ):
                await sup.extend_grace(86_400)
            await sup.extend_grace(86_400 - 10)  # exactly to the week
            deadline = sup.snapshot()["grace_deadline"]
            assert deadline is not None
            assert math.isfinite(deadline)
            assert await drained_at(sup, cut) - start == pytest.approx(7 * 86_400)
