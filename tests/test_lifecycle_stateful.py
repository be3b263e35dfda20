"""Random lifecycles, from the very first instant, against the supervisor's invariants.

A Hypothesis state machine drives a real Supervisor whose ``serve()`` runs in a
trio loop of its own (on a thread, with a mock clock that only moves when a rule
says so). The machine may act before ``serve()`` runs (app "idle") and while it
starts: each service waits, before ``ctx.ready()``, for a gate the machine opens
(``let_ready``) or a mock-clock delay, so start, restart, drain, escalate, extend,
SIGTERM/SIGINT/SIGHUP (through ``dispatch_signal``, the path real signals take),
crashes of every kind (``RuntimeError``, ``SystemExit``, ``KeyboardInterrupt``),
a service returning by itself and an outside cancellation of ``serve()`` all land
in every phase: idle, starting, running, pre-drain, draining, teardown. Each
example draws when serve() runs, from which step the app may be ended, and how
much mock time passes after each step.

Three services, registered as c, b, a so that ``after=`` reorders them (start order
c, a, b): ``c`` (a ``worker_pool`` over a ``MemoryQueue``, with a drawn restart
policy), ``a`` (permanent, its own nursery of workers) and ``b`` (transient, after
``a``, ``ctx.run_workers``).

After every step, and once more when the machine winds the supervisor down, it
checks that:

- each service is in exactly one state, and its state events form one unbroken
  chain ending in that state (one event per change);
- one runner per service: its function never runs twice at once;
- during start-up a service starts only once its predecessor in start order is
  ready or has ended, and at most once; a whole-app drain stops services in stop
  order; a restart of every service (SIGHUP) starts them in start order, each only
  while every later one is stopped, never during start-up, and one asked for
  during start-up begins the moment start-up ends;
- no job starts after its service began draining, no job runs past its deadline
  (read in the block when it ends), and once a ``SystemExit``/``KeyboardInterrupt``
  or an outside cancellation tears the supervisor down, no job runs longer than
  the grace from then;
- SIGTERM/SIGINT or a whole-app drain begins a drain at any instant (before
  ``serve()`` runs too); a second SIGTERM/SIGINT or a whole-app escalate stops the
  app in the same instant; an escalate of one service ends its run at once; a
  SIGTERM drain ends within the pre-drain delay plus the grace; once every service
  ended by itself (none drained by the operator), the app stops;
- control calls are refused (``InvalidTransitionError``) only where a refusal is
  expected, with a clear message;
- job counts add up, and agree with what the job code saw: entered == completed +
  failed + hard-cancelled + in flight;
- nothing is lost: for a and b, fed == taken into a job + still queued (released
  items go back to the channel); for c every put job is acked, queued, leased by
  a running pool or dead-lettered, and none is leased once the pool stopped;
- a service raises only what the machine asked for; ``serve()`` raises only the
  ``SystemExit``/``KeyboardInterrupt`` that tore it down, in an exception group;
- the exit code matches the history: 1 if a service ended FAILED or a fatal
  exception tore the supervisor down, else 3 if a job was hard-cancelled or a
  service was cut at its deadline, else 0.

Every run tries the same examples (derandomized), so the test is deterministic; set
``ND_STATEFUL_HUNT=1`` to explore new random ones and ``ND_STATEFUL_EXAMPLES`` (default
100) to try more, e.g. ``ND_STATEFUL_HUNT=1 ND_STATEFUL_EXAMPLES=400``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import hypothesis.strategies as st
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import nursery_down as nd
from nursery_down import ServiceState as S
from nursery_down._signals import dispatch_signal
from nursery_down.queues import MemoryQueue, QueuedJob, QueueStatistics

#: Start order. Registered as c, b (after a), a: ``after=`` moves b behind a.
NAMES = ("c", "a", "b")
#: This service starts its workers with ctx.run_workers, "a" in a nursery of its own.
WORKER_GROUP_SERVICE = "b"
#: The worker_pool service; the others take items from a channel each.
POOL_SERVICE = "c"
CHANNEL_SERVICES = ("a", "b")
WORKERS = 3
GRACE = 5.0
#: A second crash within 10 s (without an operator start in between) fails a service.
MAX_RESTARTS = 1
#: The supervisor's pre-drain delay, drawn per example.
PRE_DRAINS = (0.0, 1.0, 4.0)
#: A job of this "duration" raises ValueError after FAIL_AFTER seconds.
FAIL = -1.0
FAIL_AFTER = 0.2
#: Job durations: shorter and longer than the grace, and failing.
DURATIONS = (0.2, 1.0, 7.0, 30.0, FAIL)
#: Tolerance for deadlines: the mock clock lands on a deadline up to a rounding error.
EPSILON = 1e-9
FATAL: tuple[type[BaseException], ...] = (SystemExit, KeyboardInterrupt)
#: What ends the whole app: a drain, an escalate, SIGTERM, SIGINT, an outside cancellation.
ENDINGS = ("drain", "escalate", "SIGTERM", "SIGINT", "cancel")
#: How long each service waits before ctx.ready() unless the machine opens its gate.
READY_DELAYS = (0.0, 1.0, 3.0, math.inf)
OUTCOMES = ("completed", "failed", "hard_cancelled")
INACTIVE = ("stopped", "failed")
ACTIVE = (S.STARTING, S.RUNNING, S.DRAINING, S.BACKOFF)
MAX_EXAMPLES = int(os.environ.get("ND_STATEFUL_EXAMPLES", "100"))
#: Set to explore new random examples (and keep failures in Hypothesis' database);
#: by default every run tries the same examples, so the test is never flaky.
HUNT = bool(os.environ.get("ND_STATEFUL_HUNT"))

T = TypeVar("T")
ServiceFunction = Callable[[nd.ServiceContext], Awaitable[None]]


class CountingQueue(MemoryQueue):
    """A MemoryQueue that counts what was put into it and released back."""

    def __init__(self) -> None:
        super().__init__(max_attempts=2)
        self.puts = 0
        self.releases = 0

    def put_nowait(self, payload: Any) -> int:
        self.puts += 1
        return super().put_nowait(payload)

    async def release(self, job: QueuedJob) -> None:
        self.releases += 1
        await super().release(job)


@dataclass(frozen=True)
class Exit:
    """How one run of a service function ended."""

    #: The last event seq when it ended: the supervisor's decision follows.
    seq: int
    #: A drain of the run had begun.
    draining: bool
    #: It raised an Exception (a crash), rather than returned or was cancelled.
    crashed: bool


@dataclass(frozen=True)
class Observation:
    """What the invariants read, taken in one go inside the trio thread."""

    snapshot: dict[str, Any]
    events: list[nd.Event]
    queued: dict[str, int]
    queue: QueueStatistics
    app_state: str
    exit_code: int | None
    serve_done: bool


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """Every exception in *exc*, through nested exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


class LifecycleMachine(RuleBasedStateMachine):
    sup: nd.Supervisor

    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()  # moves only in _settle()
        self.queue = CountingQueue()
        self.ready_delay = dict.fromkeys(NAMES, 0.0)
        # What the machine did and what the service code saw.
        self.fed = dict.fromkeys(NAMES, 0)
        self.entered = dict.fromkeys(NAMES, 0)
        self.outcomes = {name: dict.fromkeys(OUTCOMES, 0) for name in NAMES}
        self.extensions = 0.0
        #: The grace of the last drain, or the seconds of the last extend, asked for.
        self.granted = 0.0
        self.violations: list[str] = []
        self.runners = dict.fromkeys(NAMES, 0)
        self.crashes: dict[str, trio.Event | None] = dict.fromkeys(NAMES)
        self.crash_kind: dict[str, type[BaseException]] = {}
        self.finishes: dict[str, trio.Event | None] = dict.fromkeys(NAMES)
        #: How each run of each service ended, in order.
        self.exits: dict[str, list[Exit]] = {name: [] for name in NAMES}
        self.policies = dict.fromkeys(NAMES, "permanent")
        self.gates: dict[str, trio.Event | None] = dict.fromkeys(NAMES)
        #: The last event seq when each service called ctx.ready().
        self.ready_marks: dict[str, list[int]] = {name: [] for name in NAMES}
        #: Fatal exception types that left a service function.
        self.fatal_kinds: set[type[BaseException]] = set()
        #: Trio time the teardown began (a fatal exception left a service function, or
        #: the outside cancellation), and the first event seq that belongs to it.
        self.torn_at = math.inf
        self.torn_seq = math.inf
        self.log: list[nd.Event] = []
        self.channels: dict[str, tuple[trio.MemorySendChannel[float], Any]] = {}
        # The trio thread.
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self.stop: trio.Event | None = None
        self.serve_scope: trio.CancelScope | None = None
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.launched = False
        self.launch_after = 0
        self.end_after = 0
        self.tick = 0.0
        self.steps = 0
        self.serve_done = False
        self.serve_done_at = math.nan
        self.serve_error: BaseException | None = None

    # -- the system under test -------------------------------------------------------

    def _violation(self, message: str) -> None:
        self.violations.append(message)

    def _last_seq(self) -> int:
        events = self.sup.events()
        return events[-1].seq if events else 0

    async def _supervised(
        self, name: str, ctx: nd.ServiceContext, body: Callable[[], Awaitable[None]]
    ) -> None:
        """One run of a service function: counted, crashable and finishable on demand."""
        self.runners[name] += 1
        if self.runners[name] > 1:
            self._violation(f"{name}: {self.runners[name]} runs of its function at once")
        crash = self.crashes[name] = trio.Event()
        finish = self.finishes[name] = trio.Event()
        self.gates[name] = trio.Event()

        async def crasher() -> None:
            await crash.wait()
            kind = self.crash_kind[name]
            raise kind(f"{name} crashed on purpose")

        crashed = False
        try:
            async with trio.open_nursery() as outer:

                async def finisher() -> None:
                    # The function returns by itself (its jobs in flight finish first).
                    await finish.wait()
                    outer.cancel_scope.cancel()

                outer.start_soon(crasher)
                outer.start_soon(finisher)
                await body()
                outer.cancel_scope.cancel()
        except BaseException as exc:
            crashed = self._left_service(name, exc)
            raise
        finally:
            self.runners[name] -= 1
            self.exits[name].append(Exit(self._last_seq(), ctx.draining, crashed))
            self.crashes[name] = None
            self.finishes[name] = None
            self.gates[name] = None

    def _left_service(self, name: str, exc: BaseException) -> bool:
        """Check what left a run of the service; True if it crashed (an Exception)."""
        fatal = crashed = False
        for leaf in leaves(exc):
            if isinstance(leaf, trio.Cancelled):
                continue
            asked = str(leaf) == f"{name} crashed on purpose"
            if asked and isinstance(leaf, (*FATAL, RuntimeError)):
                fatal = fatal or isinstance(leaf, FATAL)
                crashed = crashed or isinstance(leaf, RuntimeError)
                if isinstance(leaf, FATAL):
                    self.fatal_kinds.add(type(leaf))
                continue
            self._violation(f"{name}: raised {type(leaf).__name__}: {leaf}")
        if fatal and self.torn_at == math.inf:
            self.torn_at = trio.current_time()
            self.torn_seq = self._last_seq() + 1
        return crashed

    async def _until_ready(self, ctx: nd.ServiceContext, name: str) -> None:
        """Wait for the machine's gate, the service's ready delay, or a drain."""
        gate = self.gates[name]
        assert gate is not None
        delay = self.ready_delay[name]
        if delay <= 0:
            return
        with trio.move_on_after(delay):
            async with trio.open_nursery() as race:

                async def until(wait: Callable[[], Awaitable[None]]) -> None:
                    await wait()
                    race.cancel_scope.cancel()

                race.start_soon(until, gate.wait)
                race.start_soon(until, ctx.wait_draining)

    def _job_exit(self, name: str, time_left: float) -> None:
        """A job block is about to end: it must not have run past its deadline."""
        if time_left < -EPSILON:
            self._violation(f"{name}: a job ran {-time_left:g} s past its deadline")
        now = trio.current_time()
        if now > self.torn_at + GRACE + EPSILON:
            self._violation(
                f"{name}: a job ran until {now:g}, more than the grace after the "
                f"teardown began at {self.torn_at:g}"
            )

    def _service(self, name: str) -> ServiceFunction:
        """Service a or b: workers take items from a channel into ctx.job() blocks."""

        async def service(ctx: nd.ServiceContext) -> None:
            send, receive = self.channels[name]

            def give_back(item: float) -> None:
                send.send_nowait(item)  # back into its source

            async def worker() -> None:
                try:
                    async for seconds in ctx.intake(receive, release=give_back):
                        if ctx.draining:
                            self._violation(f"{name}: intake yielded during a drain")
                        self.entered[name] += 1
                        block = ctx.job(f"{name}-{self.entered[name]}")
                        try:
                            async with block as job:
                                try:
                                    await trio.sleep(FAIL_AFTER if seconds == FAIL else seconds)
                                    if seconds == FAIL:
                                        raise ValueError("a failing job")
                                finally:
                                    self._job_exit(name, job.deadline - trio.current_time())
                        except ValueError:
                            pass
                        finally:
                            if block.outcome != "running":
                                self.outcomes[name][block.outcome] += 1
                except nd.DrainingError as exc:
                    self._violation(f"{name}: {exc}")

            async def body() -> None:
                async with trio.open_nursery() as nursery:
                    if name == WORKER_GROUP_SERVICE:
                        nursery.start_soon(ctx.run_workers, WORKERS, worker)
                    else:
                        for _ in range(WORKERS):
                            nursery.start_soon(worker)
                    await self._until_ready(ctx, name)
                    self.ready_marks[name].append(self._last_seq())
                    ctx.ready()

            await self._supervised(name, ctx, body)

        return service

    def _pool_service(self) -> ServiceFunction:
        """Service c: a worker_pool over a MemoryQueue, behind the same gate and crasher."""
        name = POOL_SERVICE

        async def handle(job: QueuedJob) -> None:
            self.entered[name] += 1
            outcome = "failed"
            try:
                seconds = float(job.payload)
                await trio.sleep(FAIL_AFTER if seconds == FAIL else seconds)
                if seconds == FAIL:
                    raise ValueError("a failing job")
                outcome = "completed"
            except trio.Cancelled:
                outcome = "hard_cancelled"  # only the deadline reaches a pool job
                raise
            finally:
                self.outcomes[name][outcome] += 1
                self._job_exit(name, self._pool_job_time_left(job.id))

        pool = nd.worker_pool(self.queue, handle, workers=WORKERS)

        async def service(ctx: nd.ServiceContext) -> None:
            async def body() -> None:
                await self._until_ready(ctx, name)
                self.ready_marks[name].append(self._last_seq())
                await pool(ctx)  # calls ctx.ready() at once

            await self._supervised(name, ctx, body)

        return service

    def _pool_job_time_left(self, key: int) -> float:
        for service in self.sup.snapshot()["services"]:
            if service["name"] != POOL_SERVICE:
                continue
            for job in service["jobs"]:
                if job["key"] == key:
                    left = job["time_left"]
                    return math.inf if left is None else float(left)
        self._violation(f"{POOL_SERVICE}: job {key} ran but was not listed as in flight")
        return math.inf

    async def _main(self, booted: threading.Event) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        self.serve_scope = trio.CancelScope()
        for name in CHANNEL_SERVICES:
            self.channels[name] = trio.open_memory_channel[float](math.inf)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            booted.set()
            await self.stop.wait()

    async def _serve(self) -> None:
        assert self.serve_scope is not None
        try:
            with self.serve_scope:
                await self.sup.serve()
        except BaseException as exc:  # checked by the invariants
            self.serve_error = exc
        finally:
            self.serve_done = True
            self.serve_done_at = trio.current_time()

    def _launch(self) -> None:
        assert self.nursery is not None
        self.launched = True
        self.nursery.start_soon(self._serve)

    def _thread(self, booted: threading.Event) -> None:
        try:
            trio.run(self._main, booted, clock=self.clock)
        except BaseException as exc:  # reported by the next call from the test thread
            self.failure = exc
            booted.set()

    def _raise_failure(self) -> None:
        failure = self.failure
        if failure is None:
            return
        if isinstance(failure, Exception):
            raise failure
        # Never let a KeyboardInterrupt or SystemExit reach pytest itself.
        raise AssertionError(f"the trio thread died of {failure!r}") from failure

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        assert self.token is not None
        self._raise_failure()
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

    @property
    def torn(self) -> bool:
        """True once a fatal exception or the outside cancellation began the teardown."""
        return self.torn_at != math.inf

    @property
    def live(self) -> bool:
        """True until serve() ended or a teardown began: until then, rules act."""
        return not self.serve_done and self.torn_at == math.inf

    # -- rules -------------------------------------------------------------------------

    @initialize(
        pre_drain=st.sampled_from(PRE_DRAINS),
        pool_policy=st.sampled_from(["permanent", "transient", "temporary"]),
        ready_delays=st.tuples(*[st.sampled_from(READY_DELAYS)] * len(NAMES)),
        launch_after=st.sampled_from([0, 0, 2, 5]),
        end_after=st.sampled_from([0, 0, 10, 20, 30, 40]),
        tick=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    )
    def boot(
        self,
        pre_drain: float,
        pool_policy: str,
        ready_delays: tuple[float, ...],
        launch_after: int,
        end_after: int,
        tick: float,
    ) -> None:
        self.sup = nd.Supervisor(
            "stateful",
            grace=GRACE,
            max_restarts=MAX_RESTARTS,
            within=10.0,
            backoff=nd.Backoff(initial=0.5, factor=2.0, maximum=4.0, jitter=0.1),
            seed=1,
            pre_drain=pre_drain,
        )
        self.ready_delay = dict(zip(NAMES, ready_delays, strict=True))
        self.policies = {"c": pool_policy, "a": "permanent", "b": "transient"}
        self.sup.add(self._pool_service(), name="c", restart=pool_policy)
        self.sup.add(self._service("b"), name="b", restart="transient", after=["a"])
        self.sup.add(self._service("a"), name="a", restart="permanent")
        booted = threading.Event()
        self.thread = threading.Thread(target=self._thread, args=(booted,), daemon=True)
        self.thread.start()
        assert booted.wait(10), "the trio thread did not start"
        self._raise_failure()
        # serve() runs after *launch_after* steps: until then the app is "idle". The
        # actions that end the app wait for *end_after* steps, so that some examples
        # end it at once (even before serve() runs) and others live long. After each
        # step *tick* seconds pass (with 0, only advance rules move the clock).
        self.launch_after = launch_after
        self.end_after = end_after
        self.tick = tick
        if not launch_after:
            self._step(self._settle_now, always=True)

    async def _settle_now(self) -> None:
        await self._settle(0)

    def _step(self, op: Callable[[], Awaitable[None]], *, always: bool = False) -> None:
        """Run one rule's *op* in the trio thread, launching serve() first when due.

        Unless *always*, the op is a no-op once the app ended or its teardown began.
        """
        self.steps += 1
        launch = not self.launched and self.steps > self.launch_after

        async def step() -> None:
            if launch:
                self._launch()
                await self._settle(0)
            if self.live or always:
                await op()
            await self._settle(self.tick)

        self._call(step)

    @rule(
        name=st.sampled_from(NAMES),
        durations=st.lists(st.sampled_from(DURATIONS), max_size=6),
    )
    def feed(self, name: str, durations: list[float]) -> None:
        async def op() -> None:
            for seconds in durations:
                if name == POOL_SERVICE:
                    self.queue.put_nowait(seconds)
                else:
                    self.channels[name][0].send_nowait(seconds)
                self.fed[name] += 1
            await self._settle(0)

        self._step(op)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0, 6.0]))
    def advance(self, seconds: float) -> None:
        async def op() -> None:
            await self._settle(seconds)

        self._step(op, always=True)

    @rule()
    def next_deadline(self) -> None:
        """Let time run to the next timer: a job's end, a backoff, a grace deadline."""

        async def op() -> None:
            await trio.testing.wait_all_tasks_blocked()
            step = trio.lowlevel.current_statistics().seconds_to_next_deadline
            await self._settle(min(step, 60.0))

        self._step(op, always=True)

    @rule(name=st.sampled_from(NAMES))
    def let_ready(self, name: str) -> None:
        async def op() -> None:
            gate = self.gates[name]
            if gate is not None:
                gate.set()
            await self._settle(0)

        self._step(op)

    @rule(name=st.sampled_from(NAMES))
    def crash(self, name: str) -> None:
        """A crash of the service alone: its restart policy applies."""
        self._crash(name, RuntimeError)

    @rule(name=st.sampled_from(NAMES))
    def finish(self, name: str) -> None:
        """The service's function returns by itself: its restart policy decides."""

        async def op() -> None:
            event = self.finishes[name]
            if event is not None:
                event.set()
            await self._settle(0)

        self._step(op)

    @rule()
    def hangup(self) -> None:
        """SIGHUP: restart every service (after start-up if it is under way)."""
        self._signal(signal.SIGHUP)

    @rule(name=st.sampled_from(NAMES), grace=st.sampled_from([None, 1.0]))
    def drain(self, name: str, grace: float | None) -> None:
        def drain() -> Awaitable[None]:
            self.granted = GRACE if grace is None else grace
            return self.sup.drain(name, grace=grace, actor="machine")

        self._control("drain", name, drain)

    @rule(name=st.sampled_from(NAMES))
    def escalate(self, name: str) -> None:
        self._control("escalate", name, lambda: self.sup.escalate(name, actor="machine"))

    @rule(name=st.sampled_from(NAMES))
    def start(self, name: str) -> None:
        self._control("start", name, lambda: self.sup.start(name, actor="machine"))

    @rule(name=st.sampled_from((*NAMES, None)))
    def restart(self, name: str | None) -> None:
        self._control("restart", name, lambda: self.sup.restart(name, actor="machine"))

    @rule(name=st.sampled_from((*NAMES, None)), seconds=st.sampled_from([1.0, 10.0]))
    def extend(self, name: str | None, seconds: float) -> None:
        def extend_grace() -> Awaitable[None]:
            self.extensions += seconds
            self.granted = seconds
            return self.sup.extend_grace(seconds, name, actor="machine")

        self._control("extend", name, extend_grace)

    @precondition(lambda self: self.steps >= self.end_after)
    @rule(how=st.sampled_from(ENDINGS), grace=st.sampled_from([None, 1.0]))
    def end(self, how: str, grace: float | None) -> None:
        """Something that ends the whole app; a second one during the drain escalates."""
        if how == "drain":
            self._control("drain", None, lambda: self.sup.drain(grace=grace, actor="machine"))
        elif how == "escalate":
            self._control("escalate", None, lambda: self.sup.escalate(actor="machine"))
        elif how == "cancel":
            self._cancel_outside()
        else:
            self._signal(signal.Signals[how])

    @precondition(lambda self: self.steps >= self.end_after)
    @rule(name=st.sampled_from(NAMES), kind=st.sampled_from(FATAL))
    def fatal_crash(self, name: str, kind: type[BaseException]) -> None:
        """SystemExit or KeyboardInterrupt in a service: it tears the supervisor down."""
        self._crash(name, kind)

    def _crash(self, name: str, kind: type[BaseException]) -> None:
        async def op() -> None:
            event = self.crashes[name]
            if event is not None and not event.is_set():
                self.crash_kind[name] = kind
                event.set()
            await self._settle(0)

        self._step(op)

    def _cancel_outside(self) -> None:
        """Cancel the scope serve() runs in, as a program that gives up on it would."""

        async def op() -> None:
            assert self.serve_scope is not None
            if not self.launched:
                return
            self.torn_at = trio.current_time()
            self.torn_seq = self._last_seq() + 1
            self.serve_scope.cancel()
            await self._settle(0)

        self._step(op)

    def _signal(self, signum: int) -> None:
        """Deliver a signal through dispatch_signal, the path real signals take."""

        async def op() -> None:
            before = self.sup.app_state
            draining = self.sup.draining
            try:
                dispatch_signal(self.sup, signum)
            except Exception as exc:  # a signal handler must never fail
                self._violation(f"dispatch_signal({signum}) raised {exc!r} while {before}")
            if signum != signal.SIGHUP and not draining and not self.sup.draining:
                self._violation(f"signal {signum} while {before} began no drain")
            await self._settle(0)
            if signum != signal.SIGHUP and draining and before != "idle" and not self.torn:
                self._expect_stopped(f"a second signal {signum} while {before}")

        self._step(op)

    def _control(self, action: str, name: str | None, call: Callable[[], Awaitable[None]]) -> None:
        async def op() -> None:
            before = self.sup.app_state
            draining = self.sup.draining
            rolling = self._rolling_restart_under_way()
            active = name is not None and S(self._service_snapshot(name)["state"]) in ACTIVE
            seq = self._last_seq()
            jobs = self._time_left()
            try:
                await call()
            except nd.InvalidTransitionError as exc:
                self._check_refusal(action, name, before, draining, rolling, str(exc))
            else:
                app_wide = name is None and action in ("drain", "escalate")
                if app_wide and not (self.sup.draining or self.sup.app_state == "stopped"):
                    self._violation(f"{action}() while {before} began no drain")
                self._check_deadlines(action, name, jobs)
            await self._settle(0)
            if action != "escalate" or before == "idle" or self.torn:
                return
            if name is None:
                self._expect_stopped(f"escalate() while {before}")
            elif active:
                # Its run ends at once (a restart under way may start it again).
                ended = any(
                    event.kind == "state" and event.service == name and event.state in INACTIVE
                    for event in self.sup.events()
                    if event.seq > seq
                )
                state = self._service_snapshot(name)["state"]
                if not ended or state == "draining":
                    self._violation(f"escalate({name!r}) while {before} left it {state}")

        self._step(op)

    def _check_refusal(
        self,
        action: str,
        name: str | None,
        before: str,
        draining: bool,
        rolling: bool,
        message: str,
    ) -> None:
        """A refusal is fine where one is expected, and must say why."""
        call = f"{action}({name!r}) while {before}"
        if not message.strip():
            self._violation(f"{call} was refused without a message")
        if before == "idle":
            expected = name is not None or action == "extend" or (action == "restart" and draining)
        elif before == "starting":
            expected = action in ("start", "extend") or (action == "restart" and draining)
            expected = expected or (action == "restart" and name is not None)
            unclear = "while the app is starting" not in message
            if action in ("start", "restart") and name is not None and not draining and unclear:
                self._violation(f"{call} was refused with an unclear message: {message}")
        elif before == "running":
            service = None if name is None else self._service_snapshot(name)["state"]
            expected = action == "extend" or (
                action == "start" and (service == "draining" or rolling)
            )
        else:  # draining
            expected = action in ("start", "restart") or (action == "extend" and name is not None)
        if not expected:
            self._violation(f"{call} was refused: {message}")

    def _expect_stopped(self, what: str) -> None:
        if self.sup.app_state != "stopped" or not self.serve_done:
            snapshot = self.sup.snapshot()
            states = {s["name"]: (s["state"], s["in_flight"]) for s in snapshot["services"]}
            self._violation(
                f"{what} did not stop the app at once: app {self.sup.app_state}, "
                f"serve() done: {self.serve_done}, services {states}"
            )

    def _time_left(self) -> dict[tuple[str, object], tuple[str, float]]:
        """Each job in flight: its service's state and its time left until its deadline."""
        return {
            (service["name"], job["key"]): (
                service["state"],
                math.inf if job["time_left"] is None else job["time_left"],
            )
            for service in self.sup.snapshot()["services"]
            for job in service["jobs"]
        }

    def _check_deadlines(
        self, action: str, name: str | None, before: dict[tuple[str, object], tuple[str, float]]
    ) -> None:
        """An accepted drain grants at most its grace; an extend moves deadlines later."""
        after = self._time_left()
        for (service, key), (_, left) in after.items():
            if name is not None and service != name:
                continue
            if action == "drain" and name is not None and left > self.granted + EPSILON:
                self._violation(f"drain({name!r}) left job {key} {left:g} s > {self.granted:g}")
            was_state, was_left = before.get((service, key), ("", math.nan))
            extended = action == "extend" and was_state == "draining"
            if extended and abs(left - was_left - self.granted) > EPSILON:
                self._violation(
                    f"extend_grace({self.granted:g}, {name!r}) moved job {key} of "
                    f"{service} from {was_left:g} s left to {left:g} s"
                )

    def _service_snapshot(self, name: str) -> dict[str, Any]:
        return next(s for s in self.sup.snapshot()["services"] if s["name"] == name)

    def _rolling_restart_under_way(self) -> bool:
        rolling = False
        for event in self.sup.events():
            flag = event.detail.get("rolling_restart") if event.kind == "app" else None
            if flag is not None:
                rolling = bool(flag)
        return rolling

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def lifecycle_holds(self) -> None:
        if self.token is None:
            return

        async def observe() -> Observation:
            return Observation(
                snapshot=self.sup.snapshot(),
                events=self.sup.events(),
                queued={
                    name: self.channels[name][0].statistics().current_buffer_used
                    for name in CHANNEL_SERVICES
                },
                queue=self.queue.statistics(),
                app_state=self.sup.app_state,
                exit_code=self.sup.exit_code,
                serve_done=self.serve_done,
            )

        seen = self._call(observe)
        assert self.violations == [], "\n".join(self.violations)
        self._collect(seen.events)
        states = self._replay()
        services = {service["name"]: service for service in seen.snapshot["services"]}
        if self.launched:
            assert self.sup.service_names == list(NAMES)
        for name in NAMES:
            service = services[name]
            assert states[name] == service["state"], f"{name}: events end at {states[name]}"
            assert S(service["state"]) in S
            ended = service["completed"] + service["failed"] + service["hard_cancelled"]
            assert self.entered[name] == ended + service["in_flight"], name
            for outcome in OUTCOMES:
                assert self.outcomes[name][outcome] == service[outcome], (name, outcome)
            # A drain waits only for jobs: with none left, the service has stopped.
            assert not (service["state"] == "draining" and service["in_flight"] == 0), name
        # Released items went back into the channel, so they are part of `queued`.
        for name in CHANNEL_SERVICES:
            assert self.fed[name] == self.entered[name] + seen.queued[name], name
        pool, queue = services[POOL_SERVICE], seen.queue
        assert self.queue.puts == self.fed[POOL_SERVICE]
        assert queue.queued + queue.leased + queue.done + queue.dead == self.queue.puts, queue
        assert queue.done == pool["completed"], (queue, pool["completed"])
        assert self.queue.releases >= pool["hard_cancelled"]
        if pool["state"] in ("running", "draining", "starting"):
            # Leased: the jobs in flight, and one the producer may hold for the next worker.
            assert queue.leased - pool["in_flight"] in (0, 1), (queue, pool["in_flight"])
        else:
            assert queue.leased == 0, f"{POOL_SERVICE} is {pool['state']} with {queue}"
        if self.launched:
            assert (seen.app_state == "stopped") == seen.serve_done, (
                f"app {seen.app_state}, serve() done: {seen.serve_done}\n{self._history()}"
            )
        if seen.serve_done:
            self._check_the_end(seen, services)

    def _check_the_end(self, seen: Observation, services: dict[str, dict[str, Any]]) -> None:
        for name, service in services.items():
            assert service["state"] in INACTIVE, f"{name} is {service['state']} after serve()"
        assert self.serve_done_at <= self.torn_at + GRACE + EPSILON, (
            f"serve() ended at {self.serve_done_at:g}, teardown began at {self.torn_at:g}"
        )
        error = self.serve_error
        if self.fatal_kinds:
            assert isinstance(error, BaseExceptionGroup), f"serve() raised {error!r}"
            for kind in self.fatal_kinds:
                assert error.split(kind)[0] is not None, f"{kind.__name__} not in {error!r}"
            unexpected = [
                leaf for leaf in leaves(error) if not isinstance(leaf, (*FATAL, trio.Cancelled))
            ]
            assert unexpected == [], f"serve() raised {error!r}"
        else:
            assert error is None, f"serve() raised {error!r}"
        failed = any(service["state"] == "failed" for service in services.values())
        cut = any(service["hard_cancelled"] or service["cut"] for service in services.values())
        if failed or self.fatal_kinds:
            expected = nd.EXIT_FAILED
        elif cut:
            expected = nd.EXIT_HARD_CANCELLED
        else:
            expected = nd.EXIT_OK
        assert seen.exit_code == expected, f"exit code {seen.exit_code}, expected {expected}"

    def _history(self, last: int = 40) -> str:
        """The last events, one a line, for failure messages."""
        return "\n".join(
            f"  {e.seq} {e.kind} {e.service or '-'}: {e.previous or ''}->{e.state or ''} "
            f"{e.message}"
            for e in self.log[-last:]
        )

    def _collect(self, events: list[nd.Event]) -> None:
        """Add the events not seen yet to the log (the history keeps only the last ones)."""
        last = self.log[-1].seq if self.log else 0
        new = [event for event in events if event.seq > last]
        if new:
            assert new[0].seq == last + 1, f"events {last + 1}..{new[0].seq - 1} were missed"
        self.log.extend(new)

    def _replay(self) -> dict[str, str]:
        """Walk the whole event log, checking the orders; return each service's state."""
        states = dict.fromkeys(NAMES, "stopped")
        app = "idle"
        start_seq = 0
        settled_in_start_up: set[str] = set()
        launched_in_start_up = dict.fromkeys(NAMES, 0)
        rolling = False
        last_rolling_launch = -1
        deferred = False
        expect_rolling = False
        #: Drained or escalated by the operator while active: the app runs on without it.
        held = dict.fromkeys(NAMES, False)
        exits = {name: list(runs) for name, runs in self.exits.items()}
        previous: nd.Event | None = None
        for event in self.log:
            if event.kind == "app":
                flag = event.detail.get("rolling_restart")
                if expect_rolling:
                    assert flag is True, (
                        f"a restart of every service asked for during start-up did not "
                        f"begin when start-up ended: {event}"
                    )
                    expect_rolling = False
                if flag is True:
                    assert event.state == "running", f"rolling restart while {event.state}"
                    assert not rolling, "two restarts of every service at once"
                    rolling, last_rolling_launch = True, -1
                elif flag is False:
                    rolling = False
                elif event.state != app:
                    app = event.state or ""
                    if app == "starting":
                        start_seq = event.seq
                    elif app == "running" and deferred:
                        expect_rolling = True
            elif event.kind == "action":
                if event.detail.get("after_start_up"):
                    deferred = True
                target = event.service
                action = event.detail.get("action")
                if target in held and action == "drain":
                    held[target] = held[target] or S(states[target]) in ACTIVE
                elif target in held and action == "escalate":
                    # An escalate only hurries a drain under way (a restart's goes on).
                    held[target] = held[target] or (
                        S(states[target]) in ACTIVE and states[target] != "draining"
                    )
            elif event.kind == "state":
                name = event.service or ""
                assert event.previous == states[name], f"{name}: broken chain at {event}"
                index = NAMES.index(name)
                later = NAMES[index + 1 :]
                if event.previous in INACTIVE and event.state == "starting":
                    held[name] = False
                    if app == "starting":
                        launched_in_start_up[name] += 1
                        assert launched_in_start_up[name] == 1, f"{name} launched twice: {event}"
                        if index:
                            before = NAMES[index - 1]
                            ready = any(
                                start_seq <= mark < event.seq for mark in self.ready_marks[before]
                            )
                            assert ready or before in settled_in_start_up, (
                                f"{name} started before {before} was ready or ended: {event}"
                            )
                    if event.message == "restart (every service)":
                        assert rolling, f"{event} outside a restart of every service"
                        assert index > last_rolling_launch, f"out of start order: {event}"
                        last_rolling_launch = index
                        assert all(states[other] in INACTIVE for other in later), (
                            f"{name} started again while a later service runs: {states}"
                        )
                operator = (
                    previous is not None
                    and previous.kind == "action"
                    and previous.service == name
                    and previous.detail.get("action") in ("drain", "escalate")
                )
                if (
                    event.state == "draining"
                    and (app == "draining" or rolling)
                    and event.seq < self.torn_seq
                    and not operator
                ):
                    # A whole-app drain and a restart of every service stop services
                    # in stop order: each once every later one (which may use it) stopped.
                    assert all(states[other] in INACTIVE for other in later), (
                        f"{name} drained before a later service stopped: {states}, {event}"
                    )
                if event.previous in ("starting", "running", "draining") and event.state in (
                    "backoff",
                    *INACTIVE,
                ):
                    self._check_policy(name, event, exits[name])
                if app == "starting" and event.state in ("running", *INACTIVE):
                    settled_in_start_up.add(name)
                states[name] = event.state or ""
            previous = event
        ended = all(states[name] in INACTIVE and not held[name] for name in NAMES)
        assert not (app == "running" and not rolling and ended), (
            f"every service ended by itself but the app runs on: {states}\n{self._history()}"
        )
        return states

    def _check_policy(self, name: str, event: nd.Event, exits: list[Exit]) -> None:
        """A run ended: what follows is what its restart policy says."""
        assert exits, f"{name} ended no run before {event}"
        assert exits[0].seq < event.seq, f"{name} ended no run before {event}"
        run = exits.pop(0)
        if event.seq >= self.torn_seq:
            return  # torn down: cancelled, whatever the policy
        policy = self.policies[name]
        expected: tuple[str, ...]
        if run.draining:
            expected = ("failed",) if run.crashed else ("stopped",)
        elif run.crashed:
            expected = ("failed",) if policy == "temporary" else ("backoff", "failed")
        else:  # returned by itself
            expected = ("backoff", "failed") if policy == "permanent" else ("stopped",)
        assert event.state in expected, (
            f"{name} ({policy}) {'crashed' if run.crashed else 'returned'}"
            f"{' while draining' if run.draining else ''}: expected {expected}, got {event}"
        )

    # -- the end ---------------------------------------------------------------------------

    async def _wind_down(self) -> None:
        """Stop the supervisor (as a deploy would: SIGTERM) and wait for the end."""
        if not self.launched:
            self._launch()
            await self._settle(0)
        bound = math.inf
        if self.live and not self.sup.draining:
            bound = trio.current_time() + self.sup.pre_drain + GRACE
            dispatch_signal(self.sup, signal.SIGTERM)
        limit = trio.current_time() + 30 + self.extensions
        while not self.serve_done and trio.current_time() < limit:
            await self._settle(1.0)
        if not self.serve_done:
            self._violation(f"the supervisor did not stop: {self.sup.snapshot()}")
            self.sup.escalate_nowait(actor="machine")
            await self._settle(GRACE)
        if self.serve_done_at > bound + EPSILON:
            self._violation(
                f"a SIGTERM drain took until {self.serve_done_at:g}, past {bound:g} "
                "(pre-drain delay + grace)"
            )

    def teardown(self) -> None:
        try:
            if self.thread is not None and self.token is not None and self.failure is None:
                self._call(self._wind_down)
                self.lifecycle_holds()
        finally:
            self._stop_thread()
        self._raise_failure()

    def _stop_thread(self) -> None:
        if self.thread is None or self.token is None:
            return

        async def finish() -> None:
            assert self.stop is not None
            if not self.serve_done and self.serve_scope is not None:
                self.serve_scope.cancel()
            self.stop.set()

        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run(finish, trio_token=self.token)
        # Nothing sleeps without the clock moving: let any deadline left pass.
        for _ in range(1000):
            if not self.thread.is_alive():
                break
            try:
                trio.from_thread.run_sync(lambda: self.clock.jump(1.0), trio_token=self.token)
            except trio.RunFinishedError:
                break
            self.thread.join(0.01)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the trio thread did not end"


LifecycleMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # The explain phase traces every line (sys.settrace) while the trio thread runs:
    # slow, and it has crashed the interpreter here. The shrunk steps say enough.
    phases=[phase for phase in Phase if phase is not Phase.explain],
)
if not HUNT:
    LifecycleMachine.TestCase.settings = settings(
        LifecycleMachine.TestCase.settings, derandomize=True, database=None
    )
test_lifecycle_invariants_hold_under_random_operations = LifecycleMachine.TestCase
