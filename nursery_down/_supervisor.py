"""Supervisor: the public face of a set of services run in one nursery.

It defines services, runs them (:meth:`Supervisor.serve`) and takes control calls;
the work is done by its parts, each owning its facts: ``_services`` runs each
service and changes its state, ``_whole_app`` does start-up, whole-app drains and
restarts and decides the exit code, each run's ``Drain`` owns that run's deadline,
and ``_snapshot`` turns it all into JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, overload

import trio

from ._events import Event, EventHub, Subscription
from ._exceptions import ConfigurationError, InvalidTransitionError, UnknownJobError
from ._health import HealthCheck
from ._pool import sources_of
from ._records import ServiceRecord
from ._services import Services
from ._snapshot import build_snapshot
from ._sources import SourceWatch
from ._spec import Backoff, ServiceFunction, make_spec, start_order
from ._state import ACTIVE_STATES, ServiceState
from ._tasks import await_chain, describe_chain, task_tree
from ._validate import require_extension, require_seconds
from ._whole_app import (
    EXIT_FAILED as EXIT_FAILED,
)
from ._whole_app import (
    EXIT_HARD_CANCELLED as EXIT_HARD_CANCELLED,
)
from ._whole_app import (
    EXIT_OK as EXIT_OK,
)
from ._whole_app import (
    EXIT_USAGE as EXIT_USAGE,
)
from ._whole_app import AppState, WholeApp, exit_code_for_error
from .queues._source import DeadJob, JobSource

logger = logging.getLogger("nursery_down")

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
        self._hub = EventHub()
        self._services = Services(
            self._hub,
            seed=seed,
            default_grace=lambda: self.grace,
            on_settled=lambda: self._app.check_finished(),
        )
        self._app = WholeApp(
            name,
            self._hub,
            self._services,
            grace=lambda: self.grace,
            pre_drain=lambda: self.pre_drain,
        )
        # The job sources of the services: figures read while they run.
        self._sources = SourceWatch(lambda name: self._services.record(name).state in ACTIVE_STATES)
        # Shown in the snapshot: e.g. a grace that does not fit the outer kill deadline.
        self._warnings: list[str] = []
        # Set by nd.run: starts the next generation of the program (see upgrade()).
        self._upgrade: Callable[[str], Awaitable[int]] | None = None
        # Set by nd.run: what this generation knows of the one it replaced, if any.
        self._previous_generation: Callable[[], dict[str, Any] | None] | None = None
        self._upgrade_timeout: float | None = None
        # Set by open_supervisor when this process is in a fleet: its FleetMember, which
        # the dashboard's fleet page uses (typed loosely: _fleet imports this module).
        self._fleet: Any = None

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
        health: HealthCheck | None = None,
        health_every: float = 10.0,
        health_timeout: float = 5.0,
        readiness: bool = True,
        sources: Iterable[JobSource] = (),
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
        health: HealthCheck | None = None,
        health_every: float = 10.0,
        health_timeout: float = 5.0,
        readiness: bool = True,
        sources: Iterable[JobSource] = (),
    ) -> ServiceFunction | Callable[[ServiceFunction], ServiceFunction]:
        """Register an async function as a service: ``@sup.service`` or ``@sup.service(...)``.

        *restart*: ``"permanent"`` (always restart), ``"transient"`` (restart after an
        error only) or ``"temporary"`` (never). *after*: names of services that must
        be ready before this one starts. *grace* overrides the supervisor's grace.

        *health*: ``async def check() -> str | None`` (or taking the ServiceContext),
        run every *health_every* seconds while the service is RUNNING, each run at
        most *health_timeout* seconds: None or ``"ok"`` is healthy, another string is
        that health, an exception or a timeout is ``"unhealthy"`` with the reason.
        *readiness*: False leaves the service out of the app's readiness (``/readyz``),
        e.g. a background job that may stop without taking the instance out of rotation.
        *sources*: job sources the service uses besides its worker pool's: their
        backlog, rates and dead letters are shown with the service.
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
                health=health,
                health_every=health_every,
                health_timeout=health_timeout,
                readiness=readiness,
                sources=sources,
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
        health: HealthCheck | None = None,
        health_every: float = 10.0,
        health_timeout: float = 5.0,
        readiness: bool = True,
        sources: Iterable[JobSource] = (),
    ) -> ServiceFunction:
        """Register *function* as a service (the non-decorator form of :meth:`service`)."""
        if self._app.state != "idle":
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
            health=health,
            health_every=health_every,
            health_timeout=health_timeout,
            readiness=readiness,
            sources=_with_pool_source(function, sources),
        )
        if spec.name in self._services.by_name:
            raise ConfigurationError(
                f"supervisor {self.name!r} already has a service named {spec.name!r}; "
                "pass a different name="
            )
        self._services.by_name[spec.name] = ServiceRecord(spec=spec)
        self._sources.add(spec.name, spec.sources)
        return function

    @property
    def service_names(self) -> list[str]:
        """Every service's name, in start order once running, else in registration order."""
        return [record.name for record in self._services.all()]

    def check(self) -> None:
        """Validate the service graph now (unknown ``after=`` names, cycles, no services)."""
        if not self._services.by_name:
            raise ConfigurationError(
                f"supervisor {self.name!r} has no services; add one with @sup.service"
            )
        start_order([record.spec for record in self._services.by_name.values()])

    # -- running ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until the app has drained (or every service ended on its own).

        ``task_status.started()`` fires once start-up is over: every service is ready,
        or a drain cut start-up short. Most programs call :func:`nursery_down.run` or
        :func:`nursery_down.open_supervisor` instead.
        """
        app, services = self._app, self._services
        if app.state != "idle":
            raise ConfigurationError(f"supervisor {self.name!r} can only run once")
        self.check()
        by_name = services.by_name
        services.order = [
            by_name[spec.name] for spec in start_order([r.spec for r in by_name.values()])
        ]
        try:
            async with trio.open_nursery() as nursery:
                services.nursery = nursery
                nursery.start_soon(self._sources.run, name="job source figures")
                try:
                    await app.start_up()
                    task_status.started()
                    await app.finished.wait()
                    # Only helper tasks can be left: every service ended.
                    nursery.cancel_scope.cancel()
                finally:
                    # Whatever ends the run (an outside cancellation, an exception
                    # tearing this nursery down), nothing in flight outlives the grace.
                    services.cut_off(app.deadline)
        except BaseException as exc:
            if _has_error(exc):
                # Even if every service stopped on the way down (and the app already
                # said "stopped, exit code 0"), this is no clean exit.
                app.crashed = True
                app.exit_code = exit_code_for_error(exc)
                message = f"torn down by {_describe(exc)}: exit code {app.exit_code}"
                logger.error("supervisor %s %s", self.name, message)
                if self.app_state == "stopped":  # (read anew: it changed during the run)
                    app.event(message)
            raise
        finally:
            services.nursery = None
            if app.exit_code is None:
                app.exit_code = app.compute_exit_code()
            if self.app_state != "stopped":  # (read anew: it changed during the run)
                app.set_state("stopped", f"stopped, exit code {app.exit_code}")
            services.reports.app_finished(app.exit_code)
            app.finished.set()
            self._hub.close()

    async def wait_finished(self) -> None:
        """Wait until the supervisor stopped: drained, or every service ended on its own."""
        await self._app.finished.wait()

    async def wait_state(self, name: str, *states: ServiceState) -> None:
        """Wait until service *name* is in one of *states*."""
        record = self._services.record(name)
        wanted = set(states)
        while record.state not in wanted:
            await self._services.wait_changed()

    async def wait_app_state(self, *states: AppState) -> None:
        """Wait until the whole app is in one of *states* (``"running"``, ``"stopped"``...)."""
        while self._app.state not in states:
            await self._services.wait_changed()

    @property
    def running(self) -> bool:
        """True while :meth:`serve` runs."""
        return self._services.nursery is not None

    @property
    def app_state(self) -> AppState:
        """``idle`` (not run yet), ``starting``, ``running``, ``draining`` or ``stopped``."""
        return self._app.state

    @property
    def draining(self) -> bool:
        """True once a whole-app drain began (or was asked for before the services ran)."""
        return self._app.state == "draining" or (
            self._app.state in ("idle", "starting") and self._app.early_drain is not None
        )

    @property
    def exit_code(self) -> int | None:
        """The exit code once stopped: 0 all jobs finished, 3 some cut at the deadline,
        1 a failure."""
        return self._app.exit_code

    def state_of(self, name: str) -> ServiceState:
        """The current state of service *name*."""
        return self._services.record(name).state

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
        wait for the end. Draining something already draining moves its deadline to
        *grace* from now if that is earlier, never later (:meth:`extend_grace` does);
        draining a service that is not running changes nothing.
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
            if self._app.state == "idle":
                self._action("drain", None, actor)
                if self._app.early_drain is None:
                    self._app.early_drain = (grace, False)
                return
            self._require_running()
            self._action("drain", None, actor)
            self._app.begin_drain(grace)
            return
        record = self._services.record(name)
        self._require_running()
        self._action("drain", name, actor)
        if record.state in ACTIVE_STATES:
            record.held = True
            self._services.drain(
                record, trio.current_time() + self._services.grace_of(record, grace)
            )

    def _drain_for_upgrade(self, actor: str) -> None:
        """Drain the whole app at once, without the pre-drain delay: a new generation
        of the program took over its sockets, so there is no traffic to wait out, and
        what this one still claimed it would claim beside the new one."""
        self._require_running()
        self._action("drain", None, actor)
        self._app.begin_drain(None, delay=0.0)

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
        record = self._services.record(name)
        self._require_running()
        self._refuse_during_start_up("start", name)
        if self.draining:
            raise InvalidTransitionError(
                f"cannot start {name!r}: the whole app is draining and will exit"
            )
        if self._app.restarting_all:
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
            self._services.launch(record, "starting")

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
        record = None if name is None else self._services.record(name)
        if self.draining:
            raise InvalidTransitionError("cannot restart: the whole app is draining and will exit")
        if record is None and self._app.state in ("idle", "starting"):
            self._action("restart", None, actor, after_start_up=True)
            self._app.restart_after_start_up = True
            return
        self._require_running()
        if record is None:
            self._action("restart", None, actor)
            self._app.begin_restart_all()
            return
        self._refuse_during_start_up("restart", record.name)
        self._action("restart", record.name, actor)
        if not self._app.restarting_all:  # that one restarts this service too
            self._app.begin_restart(record)

    async def escalate(self, name: str | None = None, *, actor: str = "code") -> None:
        """Hard-cancel in-flight jobs now: move the grace deadline to the present.

        A service (or app) that was not draining begins a drain with no grace, and
        stays stopped as after :meth:`drain`. One already draining only has its drain
        hurried: what was to follow still does (a restart under way starts it again).
        A service that is not running is left alone.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.escalate_nowait(name, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def escalate_nowait(self, name: str | None = None, *, actor: str = "code") -> None:
        """:meth:`escalate` without blocking; before the services run, as for a drain."""
        if name is None:
            if self._app.state == "idle":
                self._action("escalate", None, actor)
                self._app.early_drain = (0.0, True)
                return
            self._require_running()
            self._action("escalate", None, actor)
            self._app.escalate()
            return
        record = self._services.record(name)
        self._require_running()
        self._action("escalate", name, actor)
        if record.state in ACTIVE_STATES:
            if record.state is not S.DRAINING:
                record.held = True
            self._services.drain(record, trio.current_time())

    async def extend_grace(
        self, seconds: float, name: str | None = None, *, actor: str = "code"
    ) -> None:
        """Move the grace deadline *seconds* later, for one draining service or the whole app.

        At most a day per call, and no deadline more than a week from now: beyond that,
        :class:`ConfigurationError` (nothing moves).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.extend_grace_nowait(seconds, name, actor=actor)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def extend_grace_nowait(
        self, seconds: float, name: str | None = None, *, actor: str = "code"
    ) -> None:
        """:meth:`extend_grace` without blocking.

        A :class:`ConfigurationError` refuses more than a day per call, or a deadline
        more than a week from now.
        """
        seconds = require_seconds("seconds", seconds)
        targets = self._services.order if name is None else [self._services.record(name)]
        self._require_running()
        draining = [r for r in targets if r.state is S.DRAINING]
        whole_app = name is None and self._app.state == "draining"
        if not draining and not whole_app:
            what = "nothing is draining" if name is None else f"service {name!r} is not draining"
            raise InvalidTransitionError(f"cannot extend the grace: {what}; drain it first")
        deadlines = [r.drain.deadline for r in draining if r.drain is not None]
        latest = max([*deadlines, self._app.deadline] if whole_app else deadlines, default=0.0)
        require_extension(seconds, left=latest - trio.current_time())
        self._action("extend_grace", name, actor, seconds=seconds)
        if name is None and self._app.state == "draining":
            self._app.extend(seconds)
        for record in draining:
            self._services.extend(record, seconds)

    async def upgrade(self, *, actor: str = "code") -> int:
        """Start the next generation of this program; once it is ready, drain this one.

        Returns the new generation's pid once it is ready (this one then drains and
        exits). Only a program run by :func:`nursery_down.run` or ``nursery-down run``
        can upgrade. Once started, an upgrade goes on whatever happens to its caller: a
        caller cancelled meanwhile leaves it running (its outcome is logged and shown
        in the timeline). Raises :class:`InvalidTransitionError` when an upgrade cannot
        start now (starting, draining, one under way, the previous generation still
        draining) and :class:`UpgradeError` when the new generation failed (this one
        keeps serving).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._upgrade is None:
            raise InvalidTransitionError(
                f"supervisor {self.name!r} cannot upgrade itself: only a program run by "
                "nd.run() or 'nursery-down run' can"
            )
        self._action("upgrade", None, actor)
        return await self._upgrade(actor)

    async def dead_letters(self, service: str, *, source: int = 0) -> list[DeadJob]:
        """The dead letters of *service*'s job source number *source* (its worker
        pool's is 0), oldest first. :class:`UnknownServiceError` or
        :class:`UnknownSourceError` for a name or number it does not have."""
        self._services.record(service)
        return await self._sources.dead_letters(service, source)

    async def requeue_dead_letters(
        self,
        service: str,
        ids: Iterable[int] | None = None,
        *,
        source: int = 0,
        actor: str = "code",
    ) -> int:
        """Put dead letters *ids* (all when None) back in the queue; return how many."""
        return await self._settle_dead("requeue", service, ids, source, actor)

    async def discard_dead_letters(
        self,
        service: str,
        ids: Iterable[int] | None = None,
        *,
        source: int = 0,
        actor: str = "code",
    ) -> int:
        """Delete dead letters *ids* (all when None) for good; return how many."""
        return await self._settle_dead("discard", service, ids, source, actor)

    async def _settle_dead(
        self, action: str, service: str, ids: Iterable[int] | None, source: int, actor: str
    ) -> int:
        self._services.record(service)
        chosen = None if ids is None else [int(i) for i in ids]
        entry = self._sources.entry(service, source)
        what = "all" if chosen is None else f"{len(chosen)}"
        self._action(
            f"{action} {what} dead letters of {entry.name} in",
            service,
            actor,
            ids=chosen[:100] if chosen is not None else None,
        )
        return await self._sources.settle_dead(service, source, action, chosen)

    def announce(self, message: str, **detail: Any) -> None:
        """Publish *message* about the whole app: the timeline shows it, the log has it."""
        self._app.event(message, **detail)

    # -- reading ----------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        """Every event from now on: ``with sup.subscribe() as events: async for e in events``."""
        return self._hub.subscribe()

    def events(self) -> list[Event]:
        """The recent events, oldest first."""
        return self._hub.history()

    def readiness(self, service: str | None = None) -> dict[str, Any]:
        """Whether the app should receive work now, and if not, why (``GET /readyz``).

        Ready when the app is RUNNING and every service that counts for readiness
        (all but those registered with ``readiness=False``) is RUNNING and healthy.
        With *service*, whether that one service is RUNNING and healthy (in a running
        app), whatever its ``readiness``. Returns ``{"ready": bool, "state": app
        state, "reasons": [...]}``; :class:`UnknownServiceError` for an unknown name.
        """
        app_state = self._app.state
        reasons: list[str] = []
        if app_state != "running":
            reasons.append(f"the app is {app_state if app_state != 'idle' else 'not started'}")
        if service is not None:
            records = [self._services.record(service)]
        else:
            records = [r for r in self._services.all() if r.spec.readiness]
        board = self._services.health
        for record in records:
            if record.state is not ServiceState.RUNNING:
                reasons.append(f"service {record.name} is {record.state.value}")
                continue
            health = board.get(record.name)
            if not health.healthy:
                why = f": {health.reason}" if health.reason else ""
                reasons.append(f"service {record.name} is {health.value}{why}")
        return {"ready": not reasons, "state": app_state, "reasons": reasons}

    def snapshot(self, *, max_jobs: int | None = None) -> dict[str, Any]:
        """The whole state as plain JSON-able data (the schema of ``GET /api/snapshot``).

        *max_jobs* caps the job list of each service, oldest first; ``jobs_hidden``
        says how many were left out. ``warnings`` lists what was found wrong at start
        (a grace that does not fit the outer kill deadline); ``pre_drain_until`` is the
        wall-clock end of a pre-drain delay under way, else None. In a generation
        started by an upgrade, ``previous_generation`` describes the one it replaced
        (pid, state, who asked, in-flight jobs, time left in its grace), else it is
        None. Always valid JSON: no NaN or infinity anywhere.
        """
        app = self._app
        pre_drain = app.pre_drain_scope
        return build_snapshot(
            self._services.all(),
            app=self.name,
            state=app.state,
            draining=app.state == "draining",
            grace=self.grace,
            app_deadline=app.deadline,
            exit_code=app.exit_code,
            pre_drain=self.pre_drain,
            pre_drain_until=(
                pre_drain.deadline
                if pre_drain is not None and not pre_drain.cancel_called
                else None
            ),
            warnings=self._warnings,
            max_jobs=max_jobs,
            previous_generation=(
                None if self._previous_generation is None else self._previous_generation()
            ),
            upgrade_timeout=self._upgrade_timeout,
            health=self._services.health,
            sources=self._sources,
        )

    def drain_reports(self) -> list[dict[str, Any]]:
        """The last drain reports, oldest first, as plain JSON data (``GET /api/drains``).

        One per drain of a service asked for on its own (``"scope": "service"``) and
        one per whole-app drain (``"scope": "app"``, with a report per service under
        ``services`` and the ``exit_code`` it led to). Each says who asked
        (``actor``), the ``grace``, the ``duration``, how many of the jobs in flight
        when it began ``finished``, ``failed``, were ``hard_cancelled`` or
        ``released`` to their source, the ``longest`` of them, and ``details`` of
        the cut and slowest jobs (at most 50; ``details_hidden`` counts the rest).
        """
        return self._services.reports.reports()

    def last_drain_report(self) -> dict[str, Any] | None:
        """The latest drain report (as in :meth:`drain_reports`), or None."""
        return self._services.reports.last()

    def last_app_drain_report(self) -> dict[str, Any] | None:
        """The report of the last whole-app drain, or None if there was none."""
        return self._services.reports.last_app_report()

    def job_stack(self, service: str, key: str) -> dict[str, Any]:
        """Where the in-flight job *key* of *service* waits: its task's chain of awaits.

        *key* is matched against each job's key as text. Returns ``{"service",
        "key", "task", "age", "chain", "frames": [{"function", "file", "line"}]}``,
        outermost frame first, with no local values. :class:`UnknownServiceError`
        for an unknown service, :class:`UnknownJobError` when no such job is in flight.
        """
        record = self._services.record(service)
        for job in list(record.counters.in_flight):
            if str(job.key) == key and job.task is not None:
                frames = await_chain(job.task)
                return {
                    "service": record.name,
                    "key": job.key if isinstance(job.key, str | int) else str(job.key),
                    "task": job.task.name,
                    "age": trio.current_time() - job.started,
                    "chain": describe_chain(frames),
                    "frames": frames,
                }
        raise UnknownJobError(service, key)

    def task_tree(self) -> str:
        """Every trio task of the program, as a tree, with each task's chain of awaits
        (function, file and line of each frame; no local values), as text."""
        return task_tree()

    # -- internals ----------------------------------------------------------------------

    def _require_running(self) -> None:
        if not self.running:
            when = "has stopped" if self._app.state == "stopped" else "is not running yet"
            raise InvalidTransitionError(
                f"supervisor {self.name!r} {when}; its control methods act only while "
                "it runs (nd.run() or nd.open_supervisor())"
            )

    def _refuse_during_start_up(self, action: str, name: str) -> None:
        if self._app.state in ("idle", "starting"):
            raise InvalidTransitionError(
                f"cannot {action} {name!r} while the app is starting: start-up starts "
                "every service in its turn; try again once the app is running"
            )

    def _action(self, action: str, name: str | None, actor: str, **detail: Any) -> None:
        """Record who asked for what: one ``action`` event (the audit trail) and a log line."""
        target = f"service {name}" if name else "the whole app"
        self._services.reports.asked(name, action, actor)
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


def _has_error(exc: BaseException) -> bool:
    """True unless *exc* is nothing but trio's Cancelled."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_has_error(inner) for inner in exc.exceptions)
    return not isinstance(exc, trio.Cancelled)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(_describe(inner) for inner in exc.exceptions if _has_error(inner))
    return f"{type(exc).__name__}({exc})" if str(exc) else type(exc).__name__


def _with_pool_source(function: object, sources: Iterable[JobSource]) -> Iterable[object]:
    """A worker pool's source first, then *sources* (a string is left for the check to
    refuse, rather than taken letter by letter)."""
    given: object = sources
    if isinstance(given, str | bytes):
        return given
    return (*sources_of(function), *sources)  # type: ignore[arg-type]
