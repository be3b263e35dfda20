"""Supervisor: runs services in one nursery, in order, and drives the drain state machine.

The supervisor owns the services' records and the whole-app state. Each service
run's drain belongs to its :class:`~nursery_down._drain.Drain`; the supervisor only
tells it when to begin and where the deadline is. Every change of a service's
state goes through :meth:`Supervisor._transition`, which asks ``_state`` whether it
is legal and publishes exactly one event.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, overload

import trio

from ._context import ServiceContext
from ._drain import Drain, ShieldHost
from ._events import Event, EventHub, Subscription
from ._exceptions import ConfigurationError, InvalidTransitionError, UnknownServiceError
from ._records import ServiceRecord
from ._snapshot import build_snapshot
from ._spec import Backoff, ServiceFunction, make_spec, start_order
from ._state import ACTIVE_STATES, ServiceState, Trigger, after_exit, next_state
from ._validate import require_seconds

logger = logging.getLogger("nursery_down")

#: The application as a whole: ``idle`` before it runs, ``starting`` until every
#: service is up, ``running``, ``draining`` once a whole-app drain began, ``stopped``.
AppState = Literal["idle", "starting", "running", "draining", "stopped"]

#: Exit codes of :func:`nursery_down.run`.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HARD_CANCELLED = 3

S = ServiceState


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

    Whatever ends the supervisor (every service ended, the whole app drained, an
    outside cancellation, or an exception such as ``SystemExit`` tearing its
    nursery down), no job keeps running past the grace.
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
        self.name = name
        self.grace = require_seconds("grace", grace)
        #: Seconds a whole-app drain keeps every service serving before it begins.
        self.pre_drain = require_seconds("pre_drain", pre_drain)
        self._default_max_restarts = max_restarts
        self._default_within = within
        self._backoff = backoff
        self._rng = random.Random(seed)
        self._records: dict[str, ServiceRecord] = {}
        self._order: list[ServiceRecord] = []
        self._hub = EventHub()
        self._nursery: trio.Nursery | None = None
        self._app_state: AppState = "idle"
        self._app_deadline = math.inf
        self._changed = trio.Event()
        self._finished = trio.Event()
        self._exit_code: int | None = None
        # Something other than a service's own crash tore the supervisor down.
        self._crashed = False
        # Asked for before the services ran (a signal during start-up of the program):
        # applied the moment they do. ``(grace, escalate)``.
        self._early_drain: tuple[float | None, bool] | None = None
        # A restart of every service asked for before start-up ended: runs after it.
        self._rolling_restart_waiting = False
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
        self._records[spec.name] = ServiceRecord(spec=spec)
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

        ``task_status.started()`` fires once start-up is over: every service is ready,
        or a drain cut start-up short. Most programs call :func:`nursery_down.run` or
        :func:`nursery_down.open_supervisor` instead.
        """
        if self._app_state != "idle":
            raise ConfigurationError(f"supervisor {self.name!r} can only run once")
        self.check()
        by_name = self._records
        self._order = [
            by_name[spec.name] for spec in start_order([r.spec for r in by_name.values()])
        ]
        ended_cleanly = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._start_up()
                    task_status.started()
                    await self._finished.wait()
                    ended_cleanly = True
                    # Only helper tasks can be left: every service ended.
                    nursery.cancel_scope.cancel()
                finally:
                    # Whatever ends the run (an outside cancellation, an exception
                    # tearing this nursery down), nothing in flight outlives the grace.
                    self._cut_off()
        except BaseException as exc:
            if not ended_cleanly and _has_error(exc):
                # Even if every service stopped on the way down, this is no clean exit.
                self._crashed = True
                self._exit_code = EXIT_FAILED
                logger.error("supervisor %s torn down by %s", self.name, _describe(exc))
            raise
        finally:
            self._nursery = None
            if self._exit_code is None:
                self._exit_code = self._compute_exit_code()
            if self.app_state != "stopped":
                self._set_app_state("stopped", f"stopped, exit code {self._exit_code}")
            self._finished.set()
            self._hub.close()

    async def _start_up(self) -> None:
        self._set_app_state("starting", f"starting {len(self._order)} services")
        if self._early_drain is not None:
            grace, escalate = self._early_drain
            self._begin_app_drain(0.0 if escalate else grace, delay=0.0 if escalate else None)
        for record in self._order:
            if self._app_state != "starting":  # a drain cut start-up short
                break
            if record.state in (S.STOPPED, S.FAILED) and not record.has_runner:
                self._launch(record, "starting")
            await record.settled.wait()
        if self._app_state == "starting":
            self._set_app_state("running", "every service started")
            if self._rolling_restart_waiting:
                self._rolling_restart_waiting = False
                self._begin_rolling_restart()
            self._check_finished()  # every service may have ended while starting

    def _cut_off(self) -> None:
        """Give everything still in flight at most the grace from now."""
        now = trio.current_time()
        for record in self._order:
            if record.state in ACTIVE_STATES:
                deadline = min(self._app_deadline, now + self._grace_of(record, None))
                self._drain_service(record, deadline)

    async def wait_finished(self) -> None:
        """Wait until the supervisor stopped: drained, or every service ended on its own."""
        await self._finished.wait()

    async def wait_state(self, name: str, *states: ServiceState) -> None:
        """Wait until service *name* is in one of *states*."""
        record = self._record(name)
        wanted = set(states)
        while record.state not in wanted:
            await self._changed.wait()

    async def wait_app_state(self, *states: AppState) -> None:
        """Wait until the whole app is in one of *states* (``"running"``, ``"stopped"``...)."""
        while self._app_state not in states:
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
        """True once a whole-app drain began (or was asked for before the services ran)."""
        return self._app_state == "draining" or (
            self._app_state in ("idle", "starting") and self._early_drain is not None
        )

    @property
    def exit_code(self) -> int | None:
        """The exit code once stopped: 0 all jobs finished, 3 some cut at the deadline,
        1 a failure."""
        return self._exit_code

    def state_of(self, name: str) -> ServiceState:
        """The current state of service *name*."""
        return self._record(name).state

    # -- control: each async method is the matching *_nowait call plus a checkpoint -----
    #
    # The async methods check for cancellation before acting and cannot be cancelled
    # after: a caller that sees Cancelled knows nothing was done, and one that returns
    # knows it was. The *_nowait calls act at once without blocking, for signal
    # handlers and other synchronous code. All are idempotent.

    async def drain(
        self, name: str | None = None, *, grace: float | None = None, actor: str = "code"
    ) -> None:
        """Begin a drain of one service, or of the whole app in stop order if *name* is None.

        Intake stops at once; in-flight jobs finish until *grace* seconds from now
        (default: the service's, else the supervisor's grace), then are hard-cancelled.
        Returns as soon as the drain began; :meth:`wait_state` or :meth:`wait_finished`
        wait for the end. Draining something already draining, or a service that is
        not running, changes nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.drain_nowait(name, grace=grace, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def drain_nowait(
        self, name: str | None = None, *, grace: float | None = None, actor: str = "code"
    ) -> None:
        """:meth:`drain` without blocking. A whole-app drain asked for before the
        services run (a SIGTERM during the program's start-up) begins when they do."""
        if grace is not None:
            grace = require_seconds("grace", grace)
        if name is None:
            if self._app_state == "idle":
                self._action("drain", None, actor)
                if self._early_drain is None:
                    self._early_drain = (grace, False)
                return
            self._require_running()
            self._action("drain", None, actor)
            self._begin_app_drain(grace)
            return
        record = self._record(name)
        self._require_running()
        self._action("drain", name, actor)
        if record.state in ACTIVE_STATES:
            record.held = True
            self._drain_service(record, trio.current_time() + self._grace_of(record, grace))

    async def start(self, name: str, *, actor: str = "code") -> None:
        """Start a STOPPED or FAILED service again. A service already up is left alone.

        Refused (:class:`InvalidTransitionError`) while the app starts (start-up
        starts every service in its turn), drains, or restarts every service.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.start_nowait(name, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def start_nowait(self, name: str, *, actor: str = "code") -> None:
        """:meth:`start` without blocking."""
        record = self._record(name)
        self._require_running()
        self._refuse_during_start_up("start", name)
        if self.draining:
            raise InvalidTransitionError(
                f"cannot start {name!r}: the whole app is draining and will exit"
            )
        if self._rolling_restart:
            raise InvalidTransitionError(
                f"cannot start {name!r} while every service restarts; it starts again in its turn"
            )
        if record.state is S.DRAINING:
            raise InvalidTransitionError(
                f"cannot start {name!r} while it is draining; wait until it stopped, "
                "or use restart to drain and start it again"
            )
        self._action("start", name, actor)
        stopped = record.state in (S.STOPPED, S.FAILED) and not record.has_runner
        # A restart under way starts it itself.
        if stopped and not record.restart_pending:
            record.recent_restarts.clear()  # a deliberate start: a fresh restart budget
            self._launch(record, "starting")

    async def restart(self, name: str | None = None, *, actor: str = "code") -> None:
        """Drain a service and start it again; with no name, restart every service.

        A restart of every service stops them in stop order (a service stops only
        after every service that starts after it has stopped), then starts them in
        start order, each waiting for the one before it to be ready; the process
        stays up. Returns once the restart began. Asking again while one is under way
        does nothing. A restart of one service is refused while the app starts.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.restart_nowait(name, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def restart_nowait(self, name: str | None = None, *, actor: str = "code") -> None:
        """:meth:`restart` without blocking. A restart of every service asked for while
        the app starts (a SIGHUP during start-up) begins once start-up is over."""
        record = None if name is None else self._record(name)
        if self.draining:
            raise InvalidTransitionError("cannot restart: the whole app is draining and will exit")
        if record is None and self._app_state in ("idle", "starting"):
            self._action("restart", None, actor, after_start_up=True)
            self._rolling_restart_waiting = True
            return
        self._require_running()
        if record is None:
            self._action("restart", None, actor)
            self._begin_rolling_restart()
            return
        self._refuse_during_start_up("restart", record.name)
        self._action("restart", record.name, actor)
        if not self._rolling_restart:  # that one restarts this service too
            self._begin_restart(record)

    async def escalate(self, name: str | None = None, *, actor: str = "code") -> None:
        """Hard-cancel in-flight jobs now: move the grace deadline to the present.

        A service (or app) that was not draining begins a drain with no grace. A
        service that is not running is left alone.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.escalate_nowait(name, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def escalate_nowait(self, name: str | None = None, *, actor: str = "code") -> None:
        """:meth:`escalate` without blocking; before the services run, as for a drain."""
        if name is None:
            if self._app_state == "idle":
                self._action("escalate", None, actor)
                self._early_drain = (0.0, True)
                return
            self._require_running()
            self._action("escalate", None, actor)
            self._escalate_app()
            return
        record = self._record(name)
        self._require_running()
        self._action("escalate", name, actor)
        if record.state in ACTIVE_STATES:
            record.held = True
            self._drain_service(record, trio.current_time())

    async def extend_grace(
        self, seconds: float, name: str | None = None, *, actor: str = "code"
    ) -> None:
        """Move the grace deadline *seconds* later, for one draining service or the whole app."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.extend_grace_nowait(seconds, name, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def extend_grace_nowait(
        self, seconds: float, name: str | None = None, *, actor: str = "code"
    ) -> None:
        """:meth:`extend_grace` without blocking."""
        seconds = require_seconds("seconds", seconds)
        targets = self._order if name is None else [self._record(name)]
        self._require_running()
        draining = [r for r in targets if r.state is S.DRAINING]
        if not draining and not (name is None and self._app_state == "draining"):
            what = "nothing is draining" if name is None else f"service {name!r} is not draining"
            raise InvalidTransitionError(f"cannot extend the grace: {what}; drain it first")
        self._action("extend_grace", name, actor, seconds=seconds)
        if name is None and self._app_state == "draining":
            self._app_deadline += seconds
            if self._pre_drain_scope is not None:
                self._pre_drain_extension += seconds  # for services not draining yet
        for record in draining:
            assert record.drain is not None
            record.drain.move_deadline(record.drain.deadline + seconds)

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
        wall-clock end of a pre-drain delay under way, else None. Always valid JSON:
        no NaN or infinity anywhere.
        """
        pre_drain = self._pre_drain_scope
        return build_snapshot(
            self._order or self._records.values(),
            app=self.name,
            state=self._app_state,
            draining=self._app_state == "draining",
            grace=self.grace,
            app_deadline=self._app_deadline,
            exit_code=self._exit_code,
            pre_drain=self.pre_drain,
            pre_drain_until=(
                pre_drain.deadline
                if pre_drain is not None and not pre_drain.cancel_called
                else None
            ),
            warnings=self._warnings,
            max_jobs=max_jobs,
        )

    # -- internals: lifecycle ----------------------------------------------------------

    def _record(self, name: str) -> ServiceRecord:
        try:
            return self._records[name]
        except (KeyError, TypeError):
            raise UnknownServiceError(str(name), list(self._records)) from None

    def _require_running(self) -> None:
        if self._nursery is None:
            when = "has stopped" if self._app_state == "stopped" else "is not running yet"
            raise InvalidTransitionError(
                f"supervisor {self.name!r} {when}; its control methods act only while "
                "it runs (nd.run() or nd.open_supervisor())"
            )

    def _refuse_during_start_up(self, action: str, name: str) -> None:
        if self._app_state in ("idle", "starting"):
            raise InvalidTransitionError(
                f"cannot {action} {name!r} while the app is starting: start-up starts "
                "every service in its turn; try again once the app is running"
            )

    def _grace_of(self, record: ServiceRecord, override: float | None) -> float:
        if override is not None:
            return override
        return record.spec.grace if record.spec.grace is not None else self.grace

    def _transition(
        self, record: ServiceRecord, trigger: Trigger, message: str, **detail: Any
    ) -> None:
        """The only place a service's state changes: checked against the table, one event."""
        previous = record.state
        target = next_state(record.name, previous, trigger)
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
        if target in (S.STOPPED, S.FAILED):
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

    def _publish_signal(self, name: str) -> None:
        self._hub.publish("signal", f"received {name}", detail={"signal": name})
        logger.info("received %s", name)

    def _launch(self, record: ServiceRecord, message: str) -> None:
        """Start a STOPPED/FAILED service's runner task: one runner per service, always."""
        assert self._nursery is not None
        if record.has_runner:
            raise InvalidTransitionError(f"service {record.name!r} is already running")
        if self._app_state in ("draining", "stopped"):
            raise InvalidTransitionError(
                f"cannot start {record.name!r}: the whole app is {self._app_state} and will exit"
            )
        record.settled = trio.Event()
        record.held = False
        self._begin_run(record, message)
        record.has_runner = True
        self._nursery.start_soon(self._run_service, record, name=f"service {record.name}")

    def _begin_run(self, record: ServiceRecord, message: str) -> None:
        """A fresh drain and context for the next run of the service function."""
        trigger = Trigger.BACKOFF_OVER if record.state is S.BACKOFF else Trigger.START
        drain = Drain()
        record.drain = drain
        record.context = ServiceContext(record.name, drain, record.counters, self._on_ready)
        self._transition(record, trigger, message)

    def _on_ready(self, context: ServiceContext) -> None:
        record = self._records[context.name]
        if context is not record.context:
            return  # a stale context from an earlier run of the service
        if record.state is S.STARTING:
            self._transition(record, Trigger.READY, "ready")
        record.settled.set()

    async def _run_service(self, record: ServiceRecord) -> None:
        """One task per started service: runs its function, restarting it as its policy says."""
        try:
            while await self._run_once(record):
                pass
        finally:
            record.has_runner = False
            if record.state in ACTIVE_STATES:  # torn down by an outer cancellation
                self._transition(record, Trigger.CANCEL, "cancelled")

    async def _run_once(self, record: ServiceRecord) -> bool:
        """Run the service function once; return True to run it again."""
        drain, context, spec = record.drain, record.context, record.spec
        assert drain is not None
        assert context is not None
        error: BaseException | None = None
        with drain.scope:
            # A job block directly in the service function raises this scope's shield
            # (see ShieldHost) rather than entering a scope of its own.
            drain.shield_hosts[trio.lowlevel.current_task()] = ShieldHost(
                drain.scope, keep_shield=False
            )
            try:
                await spec.function(context)
            except* Exception as group:
                error = group.exceptions[0] if len(group.exceptions) == 1 else group
        drain.close()
        if drain.job_scopes:
            # Job blocks in tasks outside the service still run: the run ends when they
            # do. With no drain under way they have lost their service, so they get
            # the grace from now.
            if not drain.draining:
                drain.begin(trio.current_time() + self._grace_of(record, None))
            await drain.wait_jobs_done()
        if drain.cut:
            record.cut += 1
        described = None
        if error is not None:
            described = record.last_error = f"{type(error).__name__}: {error}"
            logger.error("service %s crashed: %s", record.name, described, exc_info=error)
        now = trio.current_time()
        recent = record.recent_restarts
        while recent and recent[0] <= now - spec.within:
            recent.popleft()
        decision = after_exit(
            policy=spec.restart,
            error=described,
            draining=drain.draining,
            cut=drain.cut,
            recent_restarts=len(recent),
            max_restarts=spec.max_restarts,
            within=spec.within,
        )
        if decision.trigger is not Trigger.RESTART:
            self._transition(record, decision.trigger, decision.reason)
            return False
        recent.append(now)
        record.restarts += 1
        delay = spec.backoff.delay(len(recent), self._rng)
        backoff = record.backoff_scope = trio.CancelScope()
        self._transition(
            record,
            Trigger.RESTART,
            f"{decision.reason}; restarting in {delay:.2f} s",
            delay=delay,
        )
        with backoff:
            await trio.sleep(delay)
        if backoff.cancelled_caught:
            self._transition(record, Trigger.DRAIN, "drained while waiting to restart")
            return False
        self._begin_run(record, f"restart {record.restarts}")
        return True

    def _drain_service(self, record: ServiceRecord, deadline: float) -> None:
        """Begin (or tighten) the drain of one service; never waits."""
        state = record.state
        drain = record.drain
        if state in (S.STARTING, S.RUNNING):
            assert drain is not None
            self._transition(record, Trigger.DRAIN, "draining")
            drain.begin(deadline)
            if state is S.STARTING:
                # Not ready, so it took no work: call its start off now rather than
                # wait out the grace (a job it did enter keeps its shield).
                drain.abandon_start()
        elif state is S.DRAINING:
            assert drain is not None
            drain.begin(deadline)  # a drain under way only ever moves earlier here
        elif state is S.BACKOFF:
            assert record.backoff_scope is not None
            record.backoff_scope.cancel()

    # -- internals: the whole app ------------------------------------------------------

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
            if record.state is S.DRAINING:
                self._drain_service(record, now)

    def _begin_restart(self, record: ServiceRecord) -> None:
        if record.restart_pending:
            return
        assert self._nursery is not None
        record.restart_pending = True
        self._nursery.start_soon(self._restart, record, name=f"restart {record.name}")

    async def _restart(self, record: ServiceRecord) -> None:
        try:
            self._drain_service(record, trio.current_time() + self._grace_of(record, None))
            while record.state in ACTIVE_STATES or record.has_runner:
                await self._changed.wait()
            if self._app_state == "running" and not self._rolling_restart:
                record.recent_restarts.clear()
                record.restarts += 1
                self._launch(record, "restart")
                await record.settled.wait()
        finally:
            record.restart_pending = False
            self._wake()
            self._check_finished()

    def _begin_rolling_restart(self) -> None:
        if self._rolling_restart:
            return
        assert self._nursery is not None
        self._rolling_restart = True
        self._app_event(
            "restarting every service: stopping them in stop order, then starting them "
            "in start order",
            rolling_restart=True,
        )
        self._nursery.start_soon(self._restart_every_service, name="restart every service")

    async def _restart_every_service(self) -> None:
        outcome = "rolling restart ended by the drain"
        try:
            # A service stops only after every service that starts after it stopped
            # (those may use it), and starts again before them.
            stopped: list[ServiceRecord] = []
            for record in reversed(self._order):
                if record.held:
                    continue  # stopped on purpose by an operator: leave it stopped
                if record.state in ACTIVE_STATES:
                    self._drain_service(record, trio.current_time() + self._grace_of(record, None))
                elif record.state is not S.FAILED:
                    continue  # ended by itself: nothing to restart
                while record.state in ACTIVE_STATES or record.has_runner or record.restart_pending:
                    if self.draining:
                        return
                    await self._changed.wait()
                stopped.append(record)
            for record in reversed(stopped):
                if self._app_state != "running":
                    return
                if record.state in (S.STOPPED, S.FAILED) and not record.held:
                    record.recent_restarts.clear()
                    record.restarts += 1
                    self._launch(record, "restart (every service)")
                    await record.settled.wait()
            outcome = "every service restarted"
        except BaseException:
            outcome = "rolling restart cancelled"
            raise
        finally:
            self._rolling_restart = False
            self._app_event(outcome, rolling_restart=False)
            self._check_finished()

    def _check_finished(self) -> None:
        if self._app_state != "running" or self._rolling_restart:
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
        if self._crashed or any(record.state is S.FAILED for record in records):
            return EXIT_FAILED
        if any(record.counters.hard_cancelled or record.cut for record in records):
            return EXIT_HARD_CANCELLED
        return EXIT_OK


def _has_error(exc: BaseException) -> bool:
    """True unless *exc* is nothing but trio's Cancelled."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_has_error(inner) for inner in exc.exceptions)
    return not isinstance(exc, trio.Cancelled)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(_describe(inner) for inner in exc.exceptions if _has_error(inner))
    return f"{type(exc).__name__}({exc})" if str(exc) else type(exc).__name__
