"""WholeApp: the application as a whole: start-up, whole-app drain, restarts, exit code.

Start-up launches services in start order, each waiting for the one before it to
be ready. A whole-app drain waits out the pre-drain delay, then drains services in
stop order under one deadline. A restart of every service stops them in stop order
and starts them again in start order, so that no service stops while one that
starts after it (and so may use it) still runs. The app is over when a whole-app
drain ended or every service ended on its own; the exit code says how.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import trio

from ._events import EventHub
from ._exceptions import ConfigurationError, NurseryDownError, error_leaves
from ._records import ServiceRecord
from ._services import Services
from ._state import ACTIVE_STATES, ServiceState

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


def exit_code_for_error(error: BaseException) -> int:
    """The exit code of a program that *error* ended (a group or not): 2 for a
    configuration error, 1 for another error of ours, N for ``SystemExit(N)`` (1 to
    255), else 1. Ending by an exception is never "every job finished"."""
    leaves = error_leaves(error)
    if any(isinstance(leaf, ConfigurationError) for leaf in leaves):
        return EXIT_USAGE
    if any(isinstance(leaf, NurseryDownError) for leaf in leaves):
        return EXIT_FAILED
    for leaf in leaves:
        code = leaf.code if isinstance(leaf, SystemExit) else None
        if isinstance(code, int) and 0 < code < 256:
            return code
    return EXIT_FAILED


class WholeApp:
    """The state of the whole app and everything that acts on all services at once."""

    def __init__(
        self,
        name: str,
        hub: EventHub,
        services: Services,
        *,
        grace: Callable[[], float],
        pre_drain: Callable[[], float],
    ) -> None:
        self._name = name
        self._hub = hub
        self._services = services
        self._grace = grace
        self._pre_drain = pre_drain
        self.state: AppState = "idle"
        #: The trio time by which a whole-app drain is over; ``inf`` until one begins.
        self.deadline = math.inf
        self.finished = trio.Event()
        self.exit_code: int | None = None
        #: Something other than a service's own crash tore the supervisor down.
        self.crashed = False
        #: A whole-app drain asked for before the services ran: ``(grace, escalate)``.
        self.early_drain: tuple[float | None, bool] | None = None
        #: A restart of every service asked for during start-up: it runs after.
        self.restart_after_start_up = False
        #: A restart of every service is under way.
        self.restarting_all = False
        #: Open while a whole-app drain waits out its pre-drain delay.
        self.pre_drain_scope: trio.CancelScope | None = None
        self._pre_drain_extension = 0.0

    # -- state and events -----------------------------------------------------------------

    def set_state(self, state: AppState, message: str) -> None:
        self.state = state
        self._hub.publish("app", message, state=state)
        logger.info("app %s: %s", self._name, message)
        self._services.wake()

    def event(self, message: str, **detail: Any) -> None:
        """Something happened to the whole app that leaves its state as it is."""
        self._hub.publish("app", message, state=self.state, detail=detail)
        logger.info("app %s: %s", self._name, message)

    # -- start-up -------------------------------------------------------------------------

    async def start_up(self) -> None:
        """Launch every service in start order, each once the one before it is ready."""
        order = self._services.order
        self.set_state("starting", f"starting {len(order)} services")
        if self.early_drain is not None:
            grace, escalate = self.early_drain
            if escalate:
                self.escalate()
            else:
                self.begin_drain(grace)
        for record in order:
            if self.state != "starting" or self._services.closing:  # cut short
                break
            if record.state in (S.STOPPED, S.FAILED) and not record.has_runner:
                self._services.launch(record, "starting")
            await record.settled.wait()
        if self.state == "starting":
            self.set_state("running", self._describe_outcome("every service started"))
            if self.restart_after_start_up:
                self.restart_after_start_up = False
                self.begin_restart_all()
            self.check_finished()  # every service may have ended while starting

    # -- the whole-app drain -------------------------------------------------------------

    def begin_drain(self, grace: float | None, *, delay: float | None = None) -> None:
        """Begin a whole-app drain: after the pre-drain delay, every service in stop order.

        During a drain, it tightens the deadline as a drain of one service does: to
        *grace* (default: the supervisor's) from now, or from the end of a pre-drain
        delay under way, if that is earlier; a later deadline never loosens it.
        """
        if self.state == "draining":
            self.tighten(grace)
            return
        if self.state == "stopped":
            return
        nursery = self._services.nursery
        assert nursery is not None
        delay = self._pre_drain() if delay is None else delay
        now = trio.current_time()
        # The grace counts from the end of the pre-drain delay.
        self.deadline = now + delay + (self._grace() if grace is None else grace)
        self._services.reports.app_began(self._grace() if grace is None else grace)
        if delay > 0:
            self.pre_drain_scope = trio.CancelScope(deadline=now + delay)
            self.set_state(
                "draining",
                f"draining: every service keeps serving for {delay:g} s (pre-drain delay) "
                "while load balancers stop sending traffic, then drains in stop order",
            )
        else:
            self.set_state("draining", "draining every service in stop order")
        nursery.start_soon(self._drain_in_stop_order, name="drain in stop order")

    async def _drain_in_stop_order(self) -> None:
        scope = self.pre_drain_scope
        if scope is not None:
            with scope:
                await trio.sleep_forever()
            self.pre_drain_scope = None
            early = trio.current_time() < scope.deadline
            over = "cut short by an escalate" if early else "over"
            self.event(
                f"pre-drain delay {over}: draining every service in stop order", pre_drain="ended"
            )
        services = self._services
        for record in reversed(services.order):
            record.held = True
            grace = services.grace_of(record) + self._pre_drain_extension
            services.drain(record, min(self.deadline, trio.current_time() + grace))
            while record.state in ACTIVE_STATES:
                await services.wait_changed()
        self.finish()

    def tighten(self, grace: float | None) -> None:
        """Move the whole-app deadline to *grace* from now (after any pre-drain delay
        still under way), for every service draining now and later, if that is earlier."""
        now = trio.current_time()
        scope = self.pre_drain_scope
        delay = 0.0 if scope is None else max(0.0, scope.deadline - now)
        deadline = now + delay + (self._grace() if grace is None else grace)
        if deadline >= self.deadline:
            return
        self.deadline = deadline
        for record in self._services.order:
            if record.state is S.DRAINING:
                self._services.drain(record, deadline)

    def escalate(self) -> None:
        """Hard-cancel everything in flight now, beginning a drain with no grace if needed."""
        self.begin_drain(0.0, delay=0.0)
        now = trio.current_time()
        self.deadline = min(self.deadline, now)
        if self.pre_drain_scope is not None:
            self.pre_drain_scope.cancel()
        for record in self._services.order:
            if record.state is S.DRAINING:
                self._services.drain(record, now)

    def extend(self, seconds: float) -> None:
        """Move the whole-app deadline *seconds* later (services not draining yet too)."""
        self.deadline += seconds
        if self.pre_drain_scope is not None:
            self._pre_drain_extension += seconds

    # -- restarts ----------------------------------------------------------------------

    def begin_restart(self, record: ServiceRecord) -> None:
        """Drain one service and start it again, in a task of its own."""
        if record.restart_pending:
            return
        nursery = self._services.nursery
        assert nursery is not None
        record.restart_pending = True
        nursery.start_soon(self._restart, record, name=f"restart {record.name}")

    async def _restart(self, record: ServiceRecord) -> None:
        services = self._services
        # The restart means to run it again; a drain asked for while it stops wins.
        record.held = False
        try:
            services.drain(record, trio.current_time() + services.grace_of(record))
            while record.state in ACTIVE_STATES or record.has_runner:
                await services.wait_changed()
            if (
                self.state == "running"
                and not self.restarting_all
                and not record.held
                and not services.closing
            ):
                record.recent_restarts.clear()
                record.restarts += 1
                services.launch(record, "restart")
                await record.settled.wait()
        finally:
            record.restart_pending = False
            services.wake()
            self.check_finished()

    def begin_restart_all(self) -> None:
        """Restart every service: stop them in stop order, then start them in start order."""
        if self.restarting_all:
            return
        nursery = self._services.nursery
        assert nursery is not None
        self.restarting_all = True
        self.event(
            "restarting every service: stopping them in stop order, then starting them "
            "in start order",
            rolling_restart=True,
        )
        nursery.start_soon(self._restart_all, name="restart every service")

    async def _restart_all(self) -> None:
        services = self._services
        outcome = "rolling restart ended by the drain"
        try:
            # A service stops only after every service that starts after it stopped
            # (those may use it), and starts again before them.
            stopped: list[ServiceRecord] = []
            for record in reversed(services.order):
                if record.held:
                    # Stopped (or stopping) on purpose by an operator: leave it so, but
                    # wait until it has stopped before what it may use stops.
                    while record.state in ACTIVE_STATES or record.has_runner:
                        if self.state != "running":
                            return
                        await services.wait_changed()
                    continue
                if record.state in ACTIVE_STATES:
                    services.drain(record, trio.current_time() + services.grace_of(record))
                elif record.state is not S.FAILED:
                    continue  # ended by itself: nothing to restart
                while record.state in ACTIVE_STATES or record.has_runner or record.restart_pending:
                    if self.state != "running" or services.closing:
                        return
                    await services.wait_changed()
                stopped.append(record)
            for record in reversed(stopped):
                if self.state != "running" or services.closing:
                    return
                if record.state in (S.STOPPED, S.FAILED) and not record.held:
                    record.recent_restarts.clear()
                    record.restarts += 1
                    services.launch(record, "restart (every service)")
                    await record.settled.wait()
            outcome = self._describe_outcome("every service restarted")
        except BaseException:
            outcome = "rolling restart cancelled"
            raise
        finally:
            self.restarting_all = False
            self._services.reports.forget(None)  # who asked for it asked for nothing more
            self.event(outcome, rolling_restart=False)
            self.check_finished()

    def _describe_outcome(self, success: str) -> str:
        """*success*, or which services did not come up (and why) if any did not."""
        down = [
            f"{record.name} ({record.state.value})"
            for record in self._services.order
            if record.state in (S.FAILED, S.BACKOFF) or (record.state is S.STOPPED and record.held)
        ]
        return success if not down else f"{success}, except: {', '.join(down)}"

    # -- the end ----------------------------------------------------------------------

    def check_finished(self) -> None:
        """Finish once every service ended on its own (none held, none restarting)."""
        if self.state != "running" or self.restarting_all:
            return
        if all(
            record.state not in ACTIVE_STATES and not record.held and not record.restart_pending
            for record in self._services.order
        ):
            self.finish()

    def finish(self) -> None:
        if self.finished.is_set():
            return
        self.exit_code = self.compute_exit_code()
        self._services.reports.app_finished(self.exit_code)
        self.set_state("stopped", f"stopped, exit code {self.exit_code}")
        self.finished.set()

    def compute_exit_code(self) -> int:
        """1 if anything failed, else 3 if the deadline cut any work, else 0."""
        records = self._services.all()
        if self.crashed or any(record.state is S.FAILED for record in records):
            return EXIT_FAILED
        if any(record.counters.hard_cancelled or record.cut for record in records):
            return EXIT_HARD_CANCELLED
        return EXIT_OK
