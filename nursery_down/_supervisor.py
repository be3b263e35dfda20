"""Supervisor: runs services in one nursery, in order, and drives the drain state machine."""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import trio

from ._context import ServiceContext
from ._events import Event, EventHub, Subscription
from ._exceptions import (
    ConfigurationError,
    InvalidTransitionError,
    UnknownServiceError,
)
from ._jobs import JobCounters
from ._spec import (
    Backoff,
    ServiceFunction,
    ServiceSpec,
    _require_finite,
    make_spec,
    start_order,
)
from ._state import ACTIVE_STATES, ServiceState, check_transition
from ._workers import ShieldHost

logger = logging.getLogger("nursery_down")

#: The application as a whole: ``starting`` until every service is up, ``running``,
#: ``draining`` once a whole-app drain began, ``stopped`` when it is over.
AppState = Literal["idle", "starting", "running", "draining", "stopped"]

#: Exit codes of :func:`nursery_down.run`.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HARD_CANCELLED = 3


@dataclass(eq=False)
class _ServiceRecord:
    """The supervisor's bookkeeping for one service, across all of its restarts."""

    spec: ServiceSpec
    supervisor: Supervisor
    state: ServiceState = ServiceState.STOPPED
    since: float = field(default_factory=time.time)
    counters: JobCounters = field(default_factory=JobCounters)
    restarts: int = 0
    recent_restarts: collections.deque[float] = field(default_factory=collections.deque)
    context: ServiceContext | None = None
    scope: trio.CancelScope | None = None
    backoff_scope: trio.CancelScope | None = None
    settled: trio.Event = field(default_factory=trio.Event)
    last_error: str | None = None
    # Stopped on purpose by a per-service drain: the app keeps running without it.
    held: bool = False
    restart_pending: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


class Supervisor:
    """Runs services in one trio nursery, each under its own cancel scope.

    Services start in registration order (moved only as ``after=`` requires), each
    waiting for the previous one to call ``ctx.ready()``, and stop in reverse. A
    crashed service restarts according to its policy, with exponential backoff,
    until it restarts more than ``max_restarts`` times within ``within`` seconds;
    then it is FAILED. A crash never cancels the other services.

    *grace* is how long in-flight jobs may keep running once a drain begins.
    *max_restarts*, *within* and *backoff* are defaults for every service; each
    service may override them. *seed* makes the backoff jitter reproducible.

    *pre_drain* delays a whole-app drain: once it is asked for, the app reports
    ``draining`` at once (``/readyz`` answers 503) while every service keeps serving
    for *pre_drain* seconds, so that load balancers stop sending it traffic; then the
    drain proper begins in stop order, and the grace counts from there. An escalate
    (or a second SIGTERM/SIGINT, which escalates) ends the delay at once.
    """

    def __init__(
        self,
        name: str = "app",
        *,
        grace: float = 30.0,
        max_restarts: int = 5,
        within: float = 60.0,
        backoff: Backoff | None = None,
        seed: int | None = None,
        pre_drain: float = 0.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                "a supervisor needs a non-empty name, e.g. Supervisor('orders')"
            )
        _require_finite("grace", grace, minimum=0.0)
        _require_finite("pre_drain", pre_drain, minimum=0.0)
        self.name = name
        self.grace = float(grace)
        #: Seconds a whole-app drain keeps every service serving before it begins.
        self.pre_drain = float(pre_drain)
        self._default_max_restarts = max_restarts
        self._default_within = within
        self._backoff = backoff
        self._rng = random.Random(seed)
        self._records: dict[str, _ServiceRecord] = {}
        self._order: list[_ServiceRecord] = []
        self._hub = EventHub()
        self._nursery: trio.Nursery | None = None
        self._app_state: AppState = "idle"
        self._app_deadline = math.inf
        self._changed = trio.Event()
        self._finished = trio.Event()
        self._exit_code: int | None = None
        self._rolling_restart = False
        # Open while a whole-app drain waits out its pre-drain delay.
        self._pre_drain_scope: trio.CancelScope | None = None
        self._pre_drain_extension = 0.0
        # Shown in the snapshot: e.g. a grace that does not fit the outer kill deadline.
        self._warnings: list[str] = []

    # -- defining services ------------------------------------------------------------

    @overload
    def service(self, function: ServiceFunction, /) -> ServiceFunction: ...

    @overload
    def service(
        self,
        function: None = None,
        /,
        *,
        name: str | None = None,
        restart: str = "permanent",
        after: Iterable[str] = (),
        grace: float | None = None,
        max_restarts: int | None = None,
        within: float | None = None,
        backoff: Backoff | None = None,
    ) -> Callable[[ServiceFunction], ServiceFunction]: ...

    def service(
        self,
        function: ServiceFunction | None = None,
        /,
        *,
        name: str | None = None,
        restart: str = "permanent",
        after: Iterable[str] = (),
        grace: float | None = None,
        max_restarts: int | None = None,
        within: float | None = None,
        backoff: Backoff | None = None,
    ) -> ServiceFunction | Callable[[ServiceFunction], ServiceFunction]:
        """Register an async function as a service: ``@sup.service`` or ``@sup.service(...)``.

        *restart*: ``"permanent"`` (always restart), ``"transient"`` (restart after an
        error only) or ``"temporary"`` (never). *after*: names of services that must
        be ready before this one starts. *grace* overrides the supervisor's grace.
        """

        def register(fn: ServiceFunction) -> ServiceFunction:
            self.add(
                fn,
                name=name,
                restart=restart,
                after=after,
                grace=grace,
                max_restarts=max_restarts,
                within=within,
                backoff=backoff,
            )
            return fn

        if function is not None:
            return register(function)
        return register

    def add(
        self,
        function: ServiceFunction,
        *,
        name: str | None = None,
        restart: str = "permanent",
        after: Iterable[str] = (),
        grace: float | None = None,
        max_restarts: int | None = None,
        within: float | None = None,
        backoff: Backoff | None = None,
    ) -> ServiceFunction:
        """Register *function* as a service (the non-decorator form of :meth:`service`)."""
        if self._app_state != "idle":
            raise ConfigurationError(
                f"cannot add a service to supervisor {self.name!r} while it runs; "
                "register every service before running it"
            )
        spec = make_spec(
            function,
            name=name,
            restart=restart,
            after=after,
            grace=grace,
            max_restarts=self._default_max_restarts if max_restarts is None else max_restarts,
            within=self._default_within if within is None else within,
            backoff=backoff if backoff is not None else self._backoff,
        )
        if spec.name in self._records:
            raise ConfigurationError(
                f"supervisor {self.name!r} already has a service named {spec.name!r}; "
                "pass a different name="
            )
        self._records[spec.name] = _ServiceRecord(spec=spec, supervisor=self)
        return function

    @property
    def service_names(self) -> list[str]:
        """Every service's name, in start order once running, else in registration order."""
        return [record.name for record in (self._order or self._records.values())]

    def check(self) -> None:
        """Validate the service graph now (unknown ``after=`` names, cycles, no services)."""
        if not self._records:
            raise ConfigurationError(
                f"supervisor {self.name!r} has no services; add one with @sup.service"
            )
        start_order([record.spec for record in self._records.values()])

    # -- running ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until the app has drained (or every service ended on its own).

        ``task_status.started()`` fires once every service is ready. Most programs call
        :func:`nursery_down.run` or :func:`nursery_down.open_supervisor` instead.
        """
        if self._app_state != "idle":
            raise ConfigurationError(f"supervisor {self.name!r} can only run once")
        self.check()
        by_name = self._records
        self._order = [
            by_name[spec.name] for spec in start_order([r.spec for r in by_name.values()])
        ]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._set_app_state("starting", f"starting {len(self._order)} services")
                for record in self._order:
                    if self.draining:
                        break
                    self._launch(record)
                    await record.settled.wait()
                if self.app_state == "starting":
                    self._set_app_state("running", "every service started")
                    self._check_finished()  # every service may have ended while starting
                task_status.started()
                await self._finished.wait()
                # Only helper tasks (a rolling restart, say) can be left: every service ended.
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self._exit_code is None:
                self._exit_code = self._compute_exit_code()
            if self.app_state != "stopped":
                self._set_app_state("stopped", "stopped")
            self._hub.close()

    async def wait_finished(self) -> None:
        """Wait until the supervisor stopped: drained, or every service ended on its own."""
        await self._finished.wait()

    async def wait_state(self, name: str, *states: ServiceState) -> None:
        """Wait until service *name* is in one of *states*."""
        record = self._record(name)
        wanted = set(states)
        while record.state not in wanted:
            await self._changed.wait()

    @property
    def running(self) -> bool:
        """True while :meth:`serve` runs."""
        return self._nursery is not None

    @property
    def app_state(self) -> AppState:
        """``idle`` (not run yet), ``starting``, ``running``, ``draining`` or ``stopped``."""
        return self._app_state

    @property
    def draining(self) -> bool:
        """True once a whole-app drain began."""
        return self._app_state == "draining"

    @property
    def exit_code(self) -> int | None:
        """The exit code once stopped: 0 all jobs finished, 3 some hard-cancelled, 1 a failure."""
        return self._exit_code

    def state_of(self, name: str) -> ServiceState:
        """The current state of service *name*."""
        return self._record(name).state

    # -- control (every method is idempotent) ------------------------------------------

    async def drain(
        self, name: str | None = None, *, grace: float | None = None, actor: str = "code"
    ) -> None:
        """Begin a drain of one service, or of the whole app in stop order if *name* is None.

        Intake stops at once; in-flight jobs finish until *grace* seconds from now
        (default: the service's, else the supervisor's grace), then are hard-cancelled.
        Returns as soon as the drain began; :meth:`wait_state` or :meth:`wait_finished`
        wait for the end. Draining something already draining changes nothing.
        """
        if grace is not None:
            _require_finite("grace", grace, minimum=0.0)
        self._require_running()
        if name is None:
            self._action("drain", None, actor)
            self._begin_app_drain(grace)
        else:
            record = self._record(name)
            self._action("drain", name, actor)
            record.held = True
            self._drain_service(record, trio.current_time() + self._grace_of(record, grace))
        # Checkpoint after acting, not before: the drain takes effect in this instant.
        await trio.lowlevel.checkpoint()

    async def start(self, name: str, *, actor: str = "code") -> None:
        """Start a STOPPED or FAILED service again. A service already up is left alone."""
        self._require_running()
        record = self._record(name)
        if self._app_state == "draining":
            raise InvalidTransitionError(
                f"cannot start {name!r}: the whole app is draining and will exit"
            )
        if record.state is ServiceState.DRAINING:
            raise InvalidTransitionError(
                f"cannot start {name!r} while it is draining; wait until it stopped, "
                "or use restart to drain and start it again"
            )
        self._action("start", name, actor)
        if record.state in (ServiceState.STOPPED, ServiceState.FAILED):
            record.recent_restarts.clear()  # a deliberate start gets a fresh restart budget
            self._launch(record)
        await trio.lowlevel.checkpoint()

    async def restart(self, name: str | None = None, *, actor: str = "code") -> None:
        """Drain a service and start it again; with no name, restart every service in turn.

        Returns once the restart began. Asking again while one is under way does nothing.
        """
        self._require_running()
        if self._app_state == "draining":
            raise InvalidTransitionError("cannot restart: the whole app is draining and will exit")
        if name is None:
            self._action("restart", None, actor)
            self._begin_rolling_restart()
        else:
            record = self._record(name)
            self._action("restart", name, actor)
            self._begin_restart(record)
        await trio.lowlevel.checkpoint()

    async def escalate(self, name: str | None = None, *, actor: str = "code") -> None:
        """Hard-cancel in-flight jobs now: move the grace deadline to the present.

        A service (or app) that was not draining begins a drain with no grace.
        """
        self._require_running()
        if name is None:
            self._action("escalate", None, actor)
            self._escalate_app()
        else:
            record = self._record(name)
            self._action("escalate", name, actor)
            record.held = record.held or record.state is not ServiceState.DRAINING
            self._drain_service(record, trio.current_time())
        await trio.lowlevel.checkpoint()

    async def extend_grace(
        self, seconds: float, name: str | None = None, *, actor: str = "code"
    ) -> None:
        """Move the grace deadline *seconds* later, for one draining service or the whole app."""
        _require_finite("seconds", seconds, minimum=0.0)
        self._require_running()
        targets = self._order if name is None else [self._record(name)]
        draining = [r for r in targets if r.state is ServiceState.DRAINING]
        if not draining and not (name is None and self._app_state == "draining"):
            what = "nothing is draining" if name is None else f"service {name!r} is not draining"
            raise InvalidTransitionError(f"cannot extend the grace: {what}; drain it first")
        self._action("extend_grace", name, actor, seconds=seconds)
        if name is None and self._app_state == "draining":
            self._app_deadline += seconds
            if self._pre_drain_scope is not None:
                self._pre_drain_extension += seconds  # for services not draining yet
        for record in draining:
            assert record.context is not None
            assert record.scope is not None
            deadline = record.context.deadline + seconds
            record.context._set_deadline(deadline)
            record.scope.deadline = deadline
        await trio.lowlevel.checkpoint()

    # -- reading ----------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        """Every event from now on: ``with sup.subscribe() as events: async for e in events``."""
        return self._hub.subscribe()

    def events(self) -> list[Event]:
        """The recent events, oldest first."""
        return self._hub.history()

    def snapshot(self, *, max_jobs: int | None = None) -> dict[str, Any]:
        """The whole state as plain JSON-able data (the schema of ``GET /api/snapshot``).

        *max_jobs* caps the job list of each service, oldest first; ``jobs_hidden``
        says how many were left out. ``warnings`` lists what was found wrong at start
        (a grace that does not fit the outer kill deadline); ``pre_drain_until`` is the
        wall-clock end of a pre-drain delay under way, else None.
        """
        try:
            now = trio.current_time()
        except RuntimeError:  # called outside trio: no ages, no deadlines
            now = math.nan
        to_wall = time.time() - now

        def wall(deadline: float) -> float | None:
            return None if not math.isfinite(deadline) or math.isnan(now) else deadline + to_wall

        services = []
        for record in self._order or self._records.values():
            counters = record.counters
            in_flight = counters.in_flight
            jobs = []
            for index, job in enumerate(in_flight):
                if max_jobs is not None and index >= max_jobs:
                    break
                deadline = job.deadline
                jobs.append(
                    {
                        "key": job.key if isinstance(job.key, str | int | float) else str(job.key),
                        "age": now - job.started,
                        "deadline": wall(deadline),
                        "time_left": (deadline - now) if math.isfinite(deadline) else None,
                        "info": {k: _jsonable(v) for k, v in job.info.items()},
                    }
                )
            context = record.context
            deadline = context.deadline if context is not None else math.inf
            if record.state is not ServiceState.DRAINING:
                deadline = math.inf
            oldest = counters.oldest_age(now)
            services.append(
                {
                    "name": record.name,
                    "state": record.state.value,
                    "in_flight": len(in_flight),
                    "completed": counters.completed,
                    "failed": counters.failed,
                    "hard_cancelled": counters.hard_cancelled,
                    "restarts": record.restarts,
                    "health": context.health if context is not None else "ok",
                    "since": record.since,
                    "oldest_job_age": oldest,
                    "grace": self._grace_of(record, None),
                    "grace_deadline": wall(deadline),
                    "restart": record.spec.restart,
                    "after": list(record.spec.after),
                    "last_error": record.last_error,
                    "jobs": jobs,
                    "jobs_hidden": max(0, len(in_flight) - len(jobs)),
                }
            )
        app_draining = self._app_state == "draining"
        pre_drain = self._pre_drain_scope
        return {
            "app": self.name,
            "pid": os.getpid(),
            "state": self._app_state,
            "draining": app_draining,
            "grace": self.grace,
            "grace_deadline": wall(self._app_deadline) if app_draining else None,
            "exit_code": self._exit_code,
            "services": services,
            "pre_drain": self.pre_drain,
            # When services stop serving: the end of a pre-drain delay under way.
            "pre_drain_until": (
                wall(pre_drain.deadline)
                if pre_drain is not None and not pre_drain.cancel_called
                else None
            ),
            "warnings": list(self._warnings),
        }

    # -- internals: lifecycle ----------------------------------------------------------

    def _record(self, name: str) -> _ServiceRecord:
        try:
            return self._records[name]
        except KeyError:
            raise UnknownServiceError(name, list(self._records)) from None

    def _require_running(self) -> None:
        if self._nursery is None:
            raise InvalidTransitionError(
                f"supervisor {self.name!r} is not running; run it with nd.run() or "
                "nd.open_supervisor() before calling its control methods"
            )

    def _grace_of(self, record: _ServiceRecord, override: float | None) -> float:
        if override is not None:
            return override
        return record.spec.grace if record.spec.grace is not None else self.grace

    def _transition(
        self, record: _ServiceRecord, target: ServiceState, message: str, **detail: Any
    ) -> None:
        """The only place a service's state changes: checked against the table, one event."""
        previous = record.state
        check_transition(record.name, previous, target)
        record.state = target
        record.since = time.time()
        self._hub.publish(
            "state",
            message,
            service=record.name,
            state=target.value,
            previous=previous.value,
            detail=detail,
        )
        logger.info("service %s: %s -> %s: %s", record.name, previous.value, target.value, message)
        self._wake()
        if target in (ServiceState.STOPPED, ServiceState.FAILED):
            record.settled.set()
            self._check_finished()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _set_app_state(self, state: AppState, message: str) -> None:
        self._app_state = state
        self._hub.publish("app", message, state=state)
        logger.info("app %s: %s", self.name, message)
        self._wake()

    def _app_event(self, message: str, **detail: Any) -> None:
        """Something happened to the whole app that leaves its state as it is."""
        self._hub.publish("app", message, state=self._app_state, detail=detail)
        logger.info("app %s: %s", self.name, message)

    def _action(self, action: str, name: str | None, actor: str, **detail: Any) -> None:
        target = f"service {name}" if name else "the whole app"
        self._hub.publish(
            "action",
            f"{action} {target} (by {actor})",
            service=name,
            detail={"action": action, "actor": actor, **detail},
        )
        logger.info("action: %s %s by %s", action, target, actor)

    def _launch(self, record: _ServiceRecord) -> None:
        """Start a STOPPED/FAILED service's runner task."""
        assert self._nursery is not None
        record.settled = trio.Event()
        record.held = False
        self._begin_incarnation(record, "starting")
        self._nursery.start_soon(self._run_service, record, name=f"service {record.name}")

    def _begin_incarnation(self, record: _ServiceRecord, message: str) -> None:
        record.context = ServiceContext(record)
        record.scope = trio.CancelScope()
        self._transition(record, ServiceState.STARTING, message)

    def _service_ready(self, record: _ServiceRecord, context: ServiceContext) -> None:
        if context is not record.context:
            return  # a stale context from an earlier run of the service
        if record.state is ServiceState.STARTING:
            self._transition(record, ServiceState.RUNNING, "ready")
        record.settled.set()

    async def _run_service(self, record: _ServiceRecord) -> None:
        """One task per started service: runs its function, restarting it as its policy says."""
        try:
            while await self._run_once(record):
                pass
        finally:
            if record.state in ACTIVE_STATES:  # torn down by an outer cancellation
                self._transition(record, ServiceState.STOPPED, "cancelled")

    async def _run_once(self, record: _ServiceRecord) -> bool:
        """Run the service function once; return True to run it again."""
        context, scope, spec = record.context, record.scope, record.spec
        assert context is not None
        assert scope is not None
        error: BaseException | None = None
        with scope:
            # A job block directly in the service function raises this scope's shield
            # (see Job) rather than entering a scope of its own.
            context._shield_hosts[trio.lowlevel.current_task()] = ShieldHost(
                scope, keep_shield=False
            )
            try:
                await spec.function(context)
            except* Exception as group:
                error = group.exceptions[0] if len(group.exceptions) == 1 else group
        context._close()
        if error is not None:
            record.last_error = f"{type(error).__name__}: {error}"
            logger.error("service %s crashed: %s", record.name, record.last_error, exc_info=error)
        if context.draining:
            if error is not None:
                self._transition(
                    record, ServiceState.FAILED, f"crashed while draining: {record.last_error}"
                )
            else:
                hard = "" if not scope.cancelled_caught else " (grace deadline reached)"
                self._transition(record, ServiceState.STOPPED, f"drained{hard}")
            return False
        if error is None and spec.restart != "permanent":
            self._transition(record, ServiceState.STOPPED, "returned")
            return False
        if error is not None and spec.restart == "temporary":
            self._transition(
                record,
                ServiceState.FAILED,
                f"crashed (temporary: not restarted): {record.last_error}",
            )
            return False
        reason = "crashed" if error is not None else "returned"
        now = trio.current_time()
        recent = record.recent_restarts
        while recent and recent[0] <= now - spec.within:
            recent.popleft()
        if len(recent) >= spec.max_restarts:
            self._transition(
                record,
                ServiceState.FAILED,
                f"{reason} after {len(recent)} restarts within {spec.within:g} s; giving up",
            )
            return False
        recent.append(now)
        record.restarts += 1
        delay = spec.backoff.delay(len(recent), self._rng)
        record.backoff_scope = trio.CancelScope()
        self._transition(
            record, ServiceState.BACKOFF, f"{reason}; restarting in {delay:.2f} s", delay=delay
        )
        with record.backoff_scope:
            await trio.sleep(delay)
        if record.backoff_scope.cancelled_caught:
            self._transition(record, ServiceState.STOPPED, "drained while waiting to restart")
            return False
        self._begin_incarnation(record, f"restart {record.restarts}")
        return True

    def _drain_service(self, record: _ServiceRecord, deadline: float) -> None:
        """Begin (or tighten) the drain of one service; never waits."""
        state = record.state
        if state in (ServiceState.STARTING, ServiceState.RUNNING):
            context, scope = record.context, record.scope
            assert context is not None
            assert scope is not None
            self._transition(record, ServiceState.DRAINING, "draining")
            context._begin_drain(deadline)
            # The service's own scope shares the deadline: at it, everything still
            # running in the service stops, not just the job blocks.
            scope.deadline = deadline
        elif state is ServiceState.DRAINING:
            context, scope = record.context, record.scope
            assert context is not None
            assert scope is not None
            if deadline < context.deadline:
                context._set_deadline(deadline)
                scope.deadline = deadline
        elif state is ServiceState.BACKOFF:
            assert record.backoff_scope is not None
            record.backoff_scope.cancel()

    def _begin_app_drain(self, grace: float | None, *, delay: float | None = None) -> None:
        if self._app_state in ("draining", "stopped"):
            return
        assert self._nursery is not None
        delay = self.pre_drain if delay is None else delay
        now = trio.current_time()
        # The grace counts from the end of the pre-drain delay.
        self._app_deadline = now + delay + (self.grace if grace is None else grace)
        if delay > 0:
            self._pre_drain_scope = trio.CancelScope(deadline=now + delay)
            self._set_app_state(
                "draining",
                f"draining: every service keeps serving for {delay:g} s (pre-drain delay) "
                "while load balancers stop sending traffic, then drains in stop order",
            )
        else:
            self._set_app_state("draining", "draining every service in stop order")
        self._nursery.start_soon(self._drain_in_stop_order, name="drain in stop order")

    async def _drain_in_stop_order(self) -> None:
        scope = self._pre_drain_scope
        if scope is not None:
            with scope:
                await trio.sleep_forever()
            self._pre_drain_scope = None
            early = trio.current_time() < scope.deadline
            over = "cut short by an escalate" if early else "over"
            self._app_event(
                f"pre-drain delay {over}: draining every service in stop order", pre_drain="ended"
            )
        for record in reversed(self._order):
            record.held = True
            grace = self._grace_of(record, None) + self._pre_drain_extension
            deadline = min(self._app_deadline, trio.current_time() + grace)
            self._drain_service(record, deadline)
            while record.state in ACTIVE_STATES:
                await self._changed.wait()
        self._finish()

    def _escalate_app(self) -> None:
        self._begin_app_drain(0.0, delay=0.0)
        now = trio.current_time()
        self._app_deadline = min(self._app_deadline, now)
        if self._pre_drain_scope is not None:
            self._pre_drain_scope.cancel()
        for record in self._order:
            if record.state is ServiceState.DRAINING:
                self._drain_service(record, now)

    def _begin_restart(self, record: _ServiceRecord) -> None:
        if record.restart_pending:
            return
        assert self._nursery is not None
        record.restart_pending = True
        self._nursery.start_soon(self._restart, record, name=f"restart {record.name}")

    async def _restart(self, record: _ServiceRecord) -> None:
        try:
            self._drain_service(record, trio.current_time() + self._grace_of(record, None))
            while record.state in ACTIVE_STATES:
                await self._changed.wait()
            if self._app_state != "draining":
                record.recent_restarts.clear()
                self._launch(record)
                record.restarts += 1
            await record.settled.wait()
        finally:
            record.restart_pending = False
            self._wake()  # a rolling restart waits for this flag

    def _begin_rolling_restart(self) -> None:
        if self._rolling_restart:
            return
        assert self._nursery is not None
        self._rolling_restart = True
        self._app_event("restarting every service in turn", rolling_restart=True)
        self._nursery.start_soon(self._restart_in_turn, name="rolling restart")

    async def _restart_in_turn(self) -> None:
        outcome = "every service restarted"
        try:
            for record in self._order:
                if self._app_state == "draining":
                    outcome = "rolling restart ended by the drain"
                    return
                if record.held:
                    continue  # stopped on purpose by an operator: leave it stopped
                self._begin_restart(record)
                while record.restart_pending:
                    await self._changed.wait()
        except BaseException:
            outcome = "rolling restart cancelled"
            raise
        finally:
            self._rolling_restart = False
            self._app_event(outcome, rolling_restart=False)

    def _check_finished(self) -> None:
        if self._app_state != "running":
            return
        if all(
            record.state not in ACTIVE_STATES and not record.held and not record.restart_pending
            for record in self._order
        ):
            self._finish()

    def _finish(self) -> None:
        if self._finished.is_set():
            return
        self._exit_code = self._compute_exit_code()
        self._set_app_state("stopped", f"stopped, exit code {self._exit_code}")
        self._finished.set()

    def _compute_exit_code(self) -> int:
        records = self._order or list(self._records.values())
        if any(record.state is ServiceState.FAILED for record in records):
            return EXIT_FAILED
        if any(record.counters.hard_cancelled for record in records):
            return EXIT_HARD_CANCELLED
        return EXIT_OK

    def _publish_signal(self, name: str) -> None:
        self._hub.publish("signal", f"received {name}", detail={"signal": name})
        logger.info("received %s", name)


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
