"""Services: each service's runs, crashes, backoffs and restarts, and its state changes.

One :class:`Services` per supervisor. It owns the service records, runs each started
service in a runner task of its own (one runner per service, always), decides what
follows each run through :func:`~nursery_down._state.after_exit`, and is the only
place where a service's state changes (:meth:`Services.transition`: checked against
the table, one event each).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import trio

from ._context import ServiceContext
from ._drain import Drain, ShieldHost
from ._events import EventHub
from ._exceptions import InvalidTransitionError, UnknownServiceError, describe_error
from ._health import HealthBoard, run_checks
from ._records import ServiceRecord
from ._reports import DrainReports
from ._state import ACTIVE_STATES, ServiceState, Trigger, after_exit, next_state

logger = logging.getLogger("nursery_down")

S = ServiceState


class Services:
    """The services of one supervisor and their runner tasks.

    *default_grace* returns the supervisor's grace (it may change before the run);
    *on_settled* is called whenever a service stopped or failed, so that the whole
    app can see whether it is over.
    """

    def __init__(
        self,
        hub: EventHub,
        *,
        seed: int | None,
        default_grace: Callable[[], float],
        on_settled: Callable[[], None],
    ) -> None:
        self._hub = hub
        self._rng = random.Random(seed)
        self._default_grace = default_grace
        self._on_settled = on_settled
        self.by_name: dict[str, ServiceRecord] = {}
        #: Start order once running (else empty).
        self.order: list[ServiceRecord] = []
        #: The nursery the runner tasks start in, while the supervisor runs.
        self.nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        #: Every service's health (set by the services and by their health checks).
        self.health = HealthBoard(hub)
        #: The story of each drain (one report per drain, the last few kept).
        self.reports = DrainReports()

    # -- looking up and waiting ---------------------------------------------------------

    def record(self, name: str) -> ServiceRecord:
        """The record of service *name*; :class:`UnknownServiceError` if there is none."""
        try:
            return self.by_name[name]
        except (KeyError, TypeError):
            raise UnknownServiceError(str(name), list(self.by_name)) from None

    def _known(self, name: str) -> None:
        """Raise :class:`UnknownServiceError` unless a service is called *name*."""
        self.record(name)

    def all(self) -> list[ServiceRecord]:
        """Every record, in start order once running, else in registration order."""
        return self.order or list(self.by_name.values())

    def grace_of(self, record: ServiceRecord, override: float | None = None) -> float:
        """*override*, else the service's own grace, else the supervisor's."""
        if override is not None:
            return override
        return record.spec.grace if record.spec.grace is not None else self._default_grace()

    def wake(self) -> None:
        """Something changed: wake every :meth:`wait_changed`."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait for the next change of any service's state (or anything else woken)."""
        await self._changed.wait()

    # -- changing state -----------------------------------------------------------------

    def transition(
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
        if target is S.RUNNING and previous is not S.RUNNING:
            self._start_health_checks(record)
        elif previous is S.RUNNING and record.health_scope is not None:
            record.health_scope.cancel()
            record.health_scope = None
        self.wake()
        if target in (S.STOPPED, S.FAILED):
            record.settled.set()
            self._on_settled()

    @property
    def closing(self) -> bool:
        """True once the runners' nursery is gone or cancelled: nothing may start now."""
        return self.nursery is None or self.nursery.cancel_scope.cancel_called

    def launch(self, record: ServiceRecord, message: str) -> None:
        """Start a STOPPED/FAILED service's runner task: one runner per service, always."""
        assert self.nursery is not None
        if self.closing:
            # Torn down (an exception left a service, or the program is ending): a run
            # started now would never be drained.
            raise InvalidTransitionError(
                f"cannot start {record.name!r}: the supervisor is shutting down"
            )
        if record.has_runner:
            raise InvalidTransitionError(f"service {record.name!r} is already running")
        record.settled = trio.Event()
        record.held = False
        self._begin_run(record, message)
        record.has_runner = True
        self.nursery.start_soon(self._run_service, record, name=f"service {record.name}")

    def drain(self, record: ServiceRecord, deadline: float) -> None:
        """Begin (or tighten) the drain of one service; never waits."""
        state = record.state
        drain = record.drain
        if state in (S.STARTING, S.RUNNING):
            assert drain is not None
            self.transition(record, Trigger.DRAIN, "draining")
            drain.begin(deadline)
            self.reports.service_began(
                record.name, drain, deadline, list(record.counters.in_flight)
            )
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

    def extend(self, record: ServiceRecord, seconds: float) -> None:
        """Move a draining service's deadline *seconds* later."""
        assert record.drain is not None
        record.drain.move_deadline(record.drain.deadline + seconds)

    def cut_off(self, app_deadline: float) -> None:
        """Give everything still in flight at most the grace from now (and the app's)."""
        now = trio.current_time()
        for record in self.all():
            if record.state in ACTIVE_STATES:
                self.reports.asked(record.name, "drain", "the supervisor stopping")
                self.drain(record, min(app_deadline, now + self.grace_of(record)))

    # -- the runner of one service --------------------------------------------------------

    def _begin_run(self, record: ServiceRecord, message: str) -> None:
        """A fresh drain and context for the next run of the service function."""
        trigger = Trigger.BACKOFF_OVER if record.state is S.BACKOFF else Trigger.START
        drain = Drain()
        record.drain = drain
        record.context = ServiceContext(
            record.name, drain, record.counters, self._on_ready, self.health, self._known
        )
        if not self.health.get(record.name).healthy:
            # A new run starts afresh: what the last one said of itself is not news.
            self.health.set(record.name, "ok", by="a new run")
        self.transition(record, trigger, message)

    def _start_health_checks(self, record: ServiceRecord) -> None:
        """Run the service's health check while it is RUNNING (if it has one)."""
        spec = record.spec
        if spec.health is None or self.closing or record.context is None:
            return
        assert self.nursery is not None
        scope = record.health_scope = trio.CancelScope()

        async def check() -> None:
            with scope:
                await run_checks(
                    self.health,
                    record.name,
                    spec.health,  # type: ignore[arg-type]  # checked above
                    record.context,
                    every=spec.health_every,
                    limit=spec.health_timeout,
                )

        self.nursery.start_soon(check, name=f"health check of {record.name}")

    def _on_ready(self, context: ServiceContext) -> None:
        record = self.by_name[context.name]
        if context is not record.context:
            return  # a stale context from an earlier run of the service
        if record.state is S.STARTING:
            self.transition(record, Trigger.READY, "ready")
        record.settled.set()

    async def _run_service(self, record: ServiceRecord) -> None:
        """One task per started service: runs its function, restarting it as its policy says."""
        try:
            while await self._run_once(record):
                pass
        finally:
            record.has_runner = False
            if record.state in ACTIVE_STATES:  # torn down by an outer cancellation
                self.transition(record, Trigger.CANCEL, "cancelled")

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
                drain.begin(trio.current_time() + self.grace_of(record))
            await drain.wait_jobs_done()
        if drain.cut:
            record.cut += 1
        self.reports.service_ended(drain)
        described = None
        if error is not None:
            described = record.last_error = describe_error(error)
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
            self.transition(record, decision.trigger, decision.reason)
            return False
        recent.append(now)
        record.restarts += 1
        delay = spec.backoff.delay(len(recent), self._rng)
        backoff = record.backoff_scope = trio.CancelScope()
        self.transition(
            record,
            Trigger.RESTART,
            f"{decision.reason}; restarting in {delay:.2f} s",
            delay=delay,
        )
        with backoff:
            await trio.sleep(delay)
        if backoff.cancelled_caught:
            self.transition(record, Trigger.DRAIN, "drained while waiting to restart")
            return False
        self._begin_run(record, f"restart {record.restarts}")
        return True
