"""run() and open_supervisor(): the two ways to run a Supervisor."""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from ._budget import check_seconds, grace_budget
from ._exceptions import ConfigurationError, NurseryDownError, error_leaves
from ._fleet import (
    DEFAULT_INTERVAL,
    FLEET_INTERVAL_ENV,
    FleetMember,
    fleet_database,
    fleet_sources,
)
from ._notify import serve_notify
from ._signals import HupAction, holding_signals, ignore_signals_until_exit, serve_signals
from ._supervisor import Supervisor
from ._upgrade import DEFAULT_TIMEOUT, Upgrader, remove_pid_file, write_pid_file
from ._validate import require_seconds, seconds_from_environ
from ._whole_app import exit_code_for_error

logger = logging.getLogger("nursery_down")


@asynccontextmanager
async def open_supervisor(
    supervisor: Supervisor,
    *,
    dashboard: str | None = None,
    handle_signals: bool = False,
    notify: bool = False,
    outer_deadline: float | None = None,
    pre_drain: float | None = None,
    upgrades: bool = False,
    on_hup: HupAction = "restart",
    upgrade_argv: Sequence[str] | None = None,
    upgrade_cwd: str | None = None,
    upgrade_timeout: float = DEFAULT_TIMEOUT,
    pid_file: str | None = None,
    fleet: str | bool | None = None,
) -> AsyncIterator[Supervisor]:
    """Run *supervisor* inside an existing trio program for the duration of the block.

    The block starts once every service is ready. Leaving it normally drains the
    whole app and waits for it to stop; leaving it with an exception hard-cancels
    in-flight work first. *dashboard* (``"HOST:PORT"``) serves the dashboard in the
    same nursery; *handle_signals* makes SIGTERM/SIGINT/SIGHUP drive the supervisor;
    *notify* reports to systemd over ``$NOTIFY_SOCKET`` when it is set
    (:func:`nursery_down.serve_notify`).

    *pre_drain* sets the supervisor's pre-drain delay (seconds). *outer_deadline* is
    how long whatever stops the program waits after SIGTERM before it kills it
    (systemd's TimeoutStopSec, Kubernetes' terminationGracePeriodSeconds): when the
    pre-drain delay, the grace and the stop margin do not fit inside it, a warning
    goes to the log and to the snapshot's ``warnings``.

    *upgrades* lets the program upgrade itself (:meth:`Supervisor.upgrade`, SIGUSR2,
    ``POST /api/upgrade``): the program is run again as *upgrade_argv* (default
    ``sys.orig_argv``) in *upgrade_cwd* (default: the working directory now), gets
    the :func:`nursery_down.listener` sockets, and has *upgrade_timeout* seconds to be
    ready; then this one drains. *on_hup* chooses what SIGHUP does: ``"restart"``
    every service, or ``"upgrade"``. :func:`nursery_down.run` turns upgrades on.
    *pid_file* is written with this process's pid at start, replaced atomically with
    the new generation's pid at an upgrade, and removed at exit if it still names us.

    *fleet* is the PostgreSQL database (a connection string) of the fleet this
    process joins: it reports itself there and obeys the actions the fleet page of
    any process asks of it. By default (None) it is ``$NURSERY_DOWN_FLEET``, else the
    database of the first :class:`~nursery_down.queues.PostgresQueue` a worker pool
    uses; False joins no fleet. It reports every ``$NURSERY_DOWN_FLEET_INTERVAL``
    seconds (default 2) and is shown as gone after three silent intervals.
    """
    if pre_drain is not None:
        supervisor.pre_drain = check_seconds("pre-drain delay", pre_drain)
    supervisor.check()
    if outer_deadline is not None:
        budget = grace_budget(
            outer_deadline,
            grace=supervisor.grace,
            pre_drain=supervisor.pre_drain,
            services=len(supervisor.service_names),
        )
        warning = budget.warning()
        if warning is None:
            logger.info(
                "grace budget: %s fits inside the outer deadline of %g s",
                budget.describe(),
                budget.outer_deadline,
            )
        else:
            logger.warning("%s", warning)
            if warning not in supervisor._warnings:
                supervisor._warnings.append(warning)
    upgrader = None
    if upgrades:
        upgrader = Upgrader(
            supervisor,
            argv=upgrade_argv,
            cwd=upgrade_cwd,
            timeout=upgrade_timeout,
            pid_file=pid_file,
        )
        supervisor._upgrade = upgrader.upgrade
        supervisor._previous_generation = upgrader.previous_generation
        supervisor._upgrade_timeout = upgrader.timeout
    member = None
    database = fleet_database(supervisor, fleet)
    if database is not None:
        interval = seconds_from_environ(FLEET_INTERVAL_ENV, "fleet interval", positive=True)
        member = FleetMember(
            supervisor,
            database,
            interval=DEFAULT_INTERVAL if interval is None else interval,
            sources=fleet_sources(supervisor),
        )
        supervisor._fleet = member
    if pid_file is not None and (upgrader is None or not upgrader.successor):
        # A generation started by an upgrade is named there by the old one once it
        # is ready: until then, and if it never is, the old one is the running one.
        write_pid_file(pid_file, os.getpid())
    try:
        async with _running(
            supervisor, dashboard, handle_signals, notify, on_hup, upgrader, member
        ) as running:
            yield running
    finally:
        if pid_file is not None:
            remove_pid_file(pid_file)
        if member is not None:
            with trio.CancelScope(shield=True):
                await member.aclose()


@asynccontextmanager
async def _running(
    supervisor: Supervisor,
    dashboard: str | None,
    handle_signals: bool,
    notify: bool,
    on_hup: HupAction,
    upgrader: Upgrader | None,
    member: FleetMember | None,
) -> AsyncIterator[Supervisor]:
    async with trio.open_nursery() as outer:
        if member is not None:
            # In the background: the fleet's database never holds the program back.
            await outer.start(member.serve)
        if handle_signals:
            # First, and last to go: no signal may arrive unowned while services start
            # or while the dashboard shuts down.
            await outer.start(partial(serve_signals, supervisor, on_hup=on_hup))
        if upgrader is not None:
            # In a generation started by an upgrade: says ready once every service is.
            outer.start_soon(upgrader.serve)
        if notify:
            # Subscribed before the services start, so it sees every one of them.
            await outer.start(serve_notify, supervisor)
        # A new generation started by an upgrade serves its (inherited) dashboard socket
        # only once its services are up: until then, the old generation answers there.
        dashboard_last = upgrader is not None and upgrader.successor
        dashboard_up = trio.Event()
        if dashboard is not None and upgrader is not None and dashboard_last:
            upgrader.hold_ready_until(dashboard_up)
        async with trio.open_nursery() as inner:

            async def start_dashboard() -> None:
                if dashboard is None:
                    return
                info = await _start_dashboard(inner, supervisor, dashboard, upgrader)
                if upgrader is not None:
                    upgrader.dashboard_token = info.token
                dashboard_up.set()

            if not dashboard_last:
                # Before the services: /readyz answers 503 while they start, and a bad
                # or taken address fails before any service ran.
                await start_dashboard()
            await inner.start(supervisor.serve)
            if dashboard_last:
                await start_dashboard()
            try:
                yield supervisor
            except BaseException:
                if supervisor.app_state in ("starting", "running", "draining"):
                    supervisor.escalate_nowait(actor="the program leaving its block")
                raise
            if supervisor.app_state in ("starting", "running"):
                supervisor.drain_nowait(actor="the program leaving its block")
            await supervisor.wait_finished()
            # The dashboard ends by itself once the supervisor stopped (it closes its
            # event streams first); this bound only guards against a stuck peer.
            inner.cancel_scope.deadline = trio.current_time() + SHUTDOWN_LIMIT
        outer.cancel_scope.cancel()


#: Seconds the dashboard may take to shut down after every service stopped.
SHUTDOWN_LIMIT = 5.0


async def _start_dashboard(
    nursery: trio.Nursery, supervisor: Supervisor, address: str, upgrader: Upgrader | None
) -> Any:
    try:
        # Imported here: the core never needs the web stack unless a dashboard is asked for.
        dashboard = importlib.import_module("nursery_down.dashboard")
    except ImportError as exc:
        raise ConfigurationError(
            f"the dashboard needs extra packages ({exc.name} is missing); "
            "install them with: pip install 'nursery-down[dashboard]'"
        ) from None
    # Once a new generation took over, this one's dashboard stops accepting: browsers
    # reconnect to the new one, which shows this one's drain.
    handed_over = None if upgrader is None else upgrader.wait_handed_over
    return await nursery.start(
        partial(dashboard.serve_dashboard, supervisor, address, handed_over=handed_over)
    )


def run(
    supervisor: Supervisor,
    *,
    dashboard: str | None = None,
    grace: float | None = None,
    handle_signals: bool = True,
    notify: bool = True,
    outer_deadline: float | None = None,
    pre_drain: float | None = None,
    on_hup: HupAction = "restart",
    upgrade_argv: Sequence[str] | None = None,
    upgrade_cwd: str | None = None,
    upgrade_timeout: float = DEFAULT_TIMEOUT,
    pid_file: str | None = None,
    fleet: str | bool | None = None,
) -> int:
    """Run *supervisor* until it drains, and return the process exit code.

    The blocking entry point of a service program::

        raise SystemExit(nd.run(sup, dashboard="127.0.0.1:8080"))

    Exit codes: 0 every job finished; 3 drained, but some jobs were hard-cancelled
    (grace exceeded or escalated); 1 a service FAILED or the program crashed;
    2 a usage or configuration error.

    Under systemd (``$NOTIFY_SOCKET`` set) it reports readiness, status, reloads and
    the drain unless *notify* is false. *outer_deadline* (default:
    ``$NURSERY_DOWN_OUTER_DEADLINE``) and *pre_drain* (default:
    ``$NURSERY_DOWN_PRE_DRAIN``, else the supervisor's own) are as for
    :func:`open_supervisor`.

    The program can upgrade itself without downtime: SIGUSR2 (or SIGHUP with
    ``on_hup="upgrade"``), ``POST /api/upgrade`` or ``nursery-down upgrade`` start the
    next generation with the :func:`nursery_down.listener` sockets; once it is ready,
    this one drains and exits. *upgrade_argv*, *upgrade_cwd*, *upgrade_timeout* and
    *pid_file* are as for :func:`open_supervisor`, and so is *fleet*, the PostgreSQL
    database of the fleet this process joins.

    With *handle_signals*, SIGTERM, SIGINT, SIGHUP and SIGUSR2 stay ignored once it
    returned, as the program is exiting: a second SIGTERM or Ctrl-C while the
    interpreter shuts down cannot turn the exit code into a death by signal or a
    KeyboardInterrupt traceback. A program that goes on afterwards can install its
    own handlers with :func:`signal.signal`.
    """
    if grace is not None:
        supervisor.grace = require_seconds("grace", grace)
    if outer_deadline is not None:
        check_seconds("outer deadline", outer_deadline, positive=True)
    if pre_drain is not None:
        check_seconds("pre-drain delay", pre_drain)

    async def main() -> int:
        # Read here, so that a bad value is logged and becomes exit code 2.
        deadline = outer_deadline
        if deadline is None:
            deadline = seconds_from_environ(
                "NURSERY_DOWN_OUTER_DEADLINE", "outer deadline", positive=True
            )
        delay = pre_drain
        if delay is None:
            delay = seconds_from_environ("NURSERY_DOWN_PRE_DRAIN", "pre-drain delay")
        async with open_supervisor(
            supervisor,
            dashboard=dashboard,
            handle_signals=handle_signals,
            notify=notify,
            outer_deadline=deadline,
            pre_drain=delay,
            upgrades=True,
            on_hup=on_hup,
            upgrade_argv=upgrade_argv,
            upgrade_cwd=upgrade_cwd,
            upgrade_timeout=upgrade_timeout,
            pid_file=pid_file,
            fleet=fleet,
        ) as running:
            # Everything allocated while starting lives as long as the program: keep it
            # out of the collector's way, so full collections stay short (they are
            # what delays an event or a drain by tens of milliseconds).
            gc.freeze()
            await running.wait_finished()
        code = running.exit_code
        assert code is not None
        return code

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with holding_signals() if handle_signals else contextlib.nullcontext():
            return trio.run(main)
    except BaseException as exc:  # every failure becomes an exit code
        return _exit_code_for(exc)
    finally:
        if handle_signals:
            ignore_signals_until_exit()


def _exit_code_for(exc: BaseException) -> int:
    """The exit code for what escaped trio.run (:func:`exit_code_for_error`), with one
    clear log line.

    By then every job has had at most its grace (the supervisor sees to that
    whatever ends it), so this only names the cause.
    """
    leaves = error_leaves(exc)
    ours = [leaf for leaf in leaves if isinstance(leaf, NurseryDownError)]
    ours.sort(key=lambda leaf: not isinstance(leaf, ConfigurationError))
    exits = [leaf for leaf in leaves if isinstance(leaf, SystemExit)]
    if ours:
        logger.error("%s", ours[0])
    elif exits:
        logger.error(
            "the program was ended by SystemExit(%r) raised inside it; work in flight "
            "had at most its grace",
            exits[0].code,
        )
    elif all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        logger.error("KeyboardInterrupt ended the program; work in flight had at most its grace")
    else:
        logger.error("the program crashed", exc_info=exc)
    return exit_code_for_error(exc)
