"""Random sequences of start/crash/drain/restart/escalate against the lifecycle invariants.

A Hypothesis state machine drives a real Supervisor running in its own trio loop
(on a thread, with a mock clock that only moves when a rule says so), and after
every step checks that:

- each service is in exactly one state, and its state events form one unbroken
  chain ending in that state (one event per change);
- no job ever starts after its service began draining, and a draining service
  with no job left in flight has stopped;
- job counts add up: entered == completed + failed + hard-cancelled + in flight;
- no item is lost: fed == taken into a job + released back + still queued.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import hypothesis.strategies as st
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import nursery_down as nd
from nursery_down import ServiceState as S

NAMES = ("a", "b")
WORKERS = 3
#: This service starts its workers with ctx.run_workers, the other in a nursery of its own.
WORKER_GROUP_SERVICE = "b"
T = TypeVar("T")


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()  # moves only in advance()
        self.sup = nd.Supervisor(
            "stateful",
            grace=5.0,
            max_restarts=3,
            within=10.0,
            backoff=nd.Backoff(initial=0.5, factor=2.0, maximum=4.0, jitter=0.1),
            seed=1,
        )
        self.fed = dict.fromkeys(NAMES, 0)
        self.entered = dict.fromkeys(NAMES, 0)
        self.released = dict.fromkeys(NAMES, 0)
        self.violations: list[str] = []
        self.crash_events: dict[str, trio.Event] = {}
        self.channels: dict[str, tuple[trio.MemorySendChannel[float], Any]] = {}
        self.token: trio.lowlevel.TrioToken | None = None
        self.stop: trio.Event | None = None
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        for name, policy in zip(NAMES, ("permanent", "transient"), strict=True):
            self.sup.add(self._service(name), name=name, restart=policy)

    # -- the system under test -------------------------------------------------------

    def _service(self, name: str) -> Callable[[nd.ServiceContext], Awaitable[None]]:
        async def service(ctx: nd.ServiceContext) -> None:
            crash = self.crash_events[name] = trio.Event()
            _, receive = self.channels[name]

            def give_back(item: float) -> None:
                self.released[name] += 1
                self.channels[name][0].send_nowait(item)  # back into its source

            async def worker() -> None:
                try:
                    async for seconds in ctx.intake(receive, release=give_back):
                        if ctx.draining:
                            self.violations.append(f"{name}: intake yielded during a drain")
                        self.entered[name] += 1
                        async with ctx.job(f"{name}-{self.entered[name]}"):
                            await trio.sleep(seconds)
                except nd.DrainingError as exc:
                    self.violations.append(f"{name}: {exc}")

            async def crasher() -> None:
                # Waits for a crash or a drain; the workers must stop through intake alone.
                async with trio.open_nursery() as race:

                    async def on_crash() -> None:
                        await crash.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(on_crash)
                    await ctx.wait_draining()
                    race.cancel_scope.cancel()
                if crash.is_set() and not ctx.draining:
                    raise RuntimeError(f"{name} crashed on purpose")

            async with trio.open_nursery() as nursery:
                if name == WORKER_GROUP_SERVICE:
                    nursery.start_soon(ctx.run_workers, WORKERS, worker)
                else:
                    for _ in range(WORKERS):
                        nursery.start_soon(worker)
                nursery.start_soon(crasher)
                ctx.ready()

        return service

    async def _main(self, started: threading.Event) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        for name in NAMES:
            self.channels[name] = trio.open_memory_channel[float](math.inf)
        async with nd.open_supervisor(self.sup):
            started.set()
            await self.stop.wait()
            self.sup._escalate_app()

    def _thread(self, started: threading.Event) -> None:
        try:
            trio.run(self._main, started, clock=self.clock)
        except BaseException as exc:  # reported by the next call from the test thread
            self.failure = exc
            started.set()

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        assert self.token is not None
        if self.failure is not None:
            raise self.failure
        return trio.from_thread.run(fn, trio_token=self.token)

    async def _settle(self, seconds: float) -> None:
        """Let *seconds* of mock time pass, stopping at every deadline on the way."""
        target = self.clock.current_time() + seconds
        while True:
            await trio.testing.wait_all_tasks_blocked()
            step = trio.lowlevel.current_statistics().seconds_to_next_deadline
            now = self.clock.current_time()
            if now + step > target:
                self.clock.jump(max(0.0, target - now))
                await trio.testing.wait_all_tasks_blocked()
                return
            self.clock.jump(step)

    # -- rules -------------------------------------------------------------------------

    @initialize()
    def boot(self) -> None:
        started = threading.Event()
        self.thread = threading.Thread(target=self._thread, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10), "the supervisor did not start"
        if self.failure is not None:
            raise self.failure

    @rule(
        name=st.sampled_from(NAMES),
        durations=st.lists(st.sampled_from([0.2, 1.0, 7.0]), max_size=8),
    )
    def feed(self, name: str, durations: list[float]) -> None:
        async def op() -> None:
            for seconds in durations:
                self.channels[name][0].send_nowait(seconds)
                self.fed[name] += 1
            await self._settle(0)

        self._call(op)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self._call(lambda: self._settle(seconds))

    @precondition(lambda self: not self.sup.draining)
    @rule(name=st.sampled_from(NAMES))
    def crash(self, name: str) -> None:
        async def op() -> None:
            event = self.crash_events.get(name)
            if event is not None:
                event.set()
            await self._settle(0)

        self._call(op)

    @rule(name=st.sampled_from((*NAMES, None)))
    def drain(self, name: str | None) -> None:
        self._control(lambda: self.sup.drain(name, actor="machine"))

    @rule(name=st.sampled_from(NAMES))
    def start(self, name: str) -> None:
        self._control(lambda: self.sup.start(name, actor="machine"))

    @rule(name=st.sampled_from((*NAMES, None)))
    def restart(self, name: str | None) -> None:
        self._control(lambda: self.sup.restart(name, actor="machine"))

    @rule(name=st.sampled_from((*NAMES, None)))
    def escalate(self, name: str | None) -> None:
        self._control(lambda: self.sup.escalate(name, actor="machine"))

    @rule(name=st.sampled_from((*NAMES, None)), seconds=st.sampled_from([1.0, 10.0]))
    def extend(self, name: str | None, seconds: float) -> None:
        self._control(lambda: self.sup.extend_grace(seconds, name, actor="machine"))

    def _control(self, action: Callable[[], Awaitable[None]]) -> None:
        async def op() -> None:
            if not self.sup.running:
                return
            # A refusal with a clear error is allowed; the invariants check the rest.
            with contextlib.suppress(nd.InvalidTransitionError):
                await action()
            await self._settle(0)

        self._call(op)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def lifecycle_holds(self) -> None:
        if self.token is None:
            return

        async def check() -> tuple[dict[str, Any], list[nd.Event], dict[str, int]]:
            queued = {
                name: self.channels[name][0].statistics().current_buffer_used for name in NAMES
            }
            return self.sup.snapshot(), self.sup.events(), queued

        snapshot, events, queued = self._call(check)
        assert self.violations == []
        for service in snapshot["services"]:
            name = service["name"]
            chain = [e for e in events if e.kind == "state" and e.service == name]
            state = "stopped"
            for event in chain:
                assert event.previous == state, f"{name}: broken chain at {event}"
                state = event.state or ""
            assert state == service["state"]
            assert S(service["state"]) in S
            ended = service["completed"] + service["failed"] + service["hard_cancelled"]
            assert self.entered[name] == ended + service["in_flight"]
            # A drain waits only for jobs: with none left, the service has stopped.
            assert not (service["state"] == "draining" and service["in_flight"] == 0), name
            # Released items went back into the channel, so they are part of `queued`.
            assert self.fed[name] == self.entered[name] + queued[name]

    def teardown(self) -> None:
        if self.token is not None and self.stop is not None and self.failure is None:
            stop = self.stop

            async def finish() -> None:
                stop.set()

            with contextlib.suppress(trio.RunFinishedError):
                self._call(finish)
        if self.thread is not None:
            # Nothing sleeps without the clock moving: let the final drain's deadline pass.
            while self.thread.is_alive():
                try:
                    trio.from_thread.run_sync(lambda: self.clock.jump(1.0), trio_token=self.token)
                except trio.RunFinishedError:
                    break
                self.thread.join(0.01)
            self.thread.join(10)
            assert not self.thread.is_alive()
        if self.failure is not None:
            raise self.failure


LifecycleMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lifecycle_invariants_hold_under_random_operations = LifecycleMachine.TestCase
