"""Telling systemd what the app is doing: the notify protocol over ``$NOTIFY_SOCKET``.

A unit with ``Type=notify`` hands the program a unix datagram socket in
``NOTIFY_SOCKET`` (a path, or a name in the abstract namespace written ``@name``);
the program sends it newline-separated ``KEY=VALUE`` lines. :func:`serve_notify`
sends, from the supervisor's events:

- ``READY=1`` once every service is running (and again after a rolling restart);
- ``STATUS=...`` with the app's state, services up and jobs in flight, on each state
  change and then at most once per :data:`STATUS_INTERVAL` while counts change;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a rolling restart (SIGHUP) begins;
- ``STOPPING=1`` the moment a whole-app drain is asked for (pre-drain delay included);
- ``EXTEND_TIMEOUT_USEC=`` while jobs are in flight during that drain: up to the grace
  deadline plus the stop margin, so that systemd does not kill a legitimate drain,
  and never further;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or
  names this process), from a trio task: a loop stuck in a blocking call stops the
  pings, and systemd restarts the program.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Any

import trio

from ._budget import STOP_MARGIN_PER_SERVICE
from ._closing import ClosesOnExit
from ._events import Event
from ._supervisor import Supervisor

logger = logging.getLogger("nursery_down")

#: Seconds between STATUS updates while only the counts change.
STATUS_INTERVAL = 1.0


#: Set once an upgrade named a new main process: this one then tells systemd nothing
#: more (with NotifyAccess=all, its STOPPING=1 would stop the unit).
_handed_over = False


def hand_over(address: str, pid: int) -> None:
    """Tell the service manager at *address* that *pid* is the main process now, and
    fall silent: every later message of this process is dropped."""
    global _handed_over  # one per process, like $NOTIFY_SOCKET
    with Notifier(address) as notifier:
        notifier.send(f"MAINPID={pid}", "READY=1")
    _handed_over = True


class Notifier(ClosesOnExit):
    """Sends notify messages to one socket address; never blocks, never raises.

    *address* is a filesystem path, or ``@name`` for the abstract namespace. A
    message that cannot be sent is dropped; the first such failure is logged.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self._failed = False
        self._socket: socket.socket | None = None
        if not address.startswith(("/", "@")):
            self._fail(f"unsupported address {address!r} (expected /path or @name)")
            return
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        except OSError as exc:
            self._fail(str(exc))

    def send(self, *lines: str) -> bool:
        """Send *lines* as one datagram; True if the socket took it."""
        if self._socket is None or not lines or _handed_over:
            return False
        try:
            self._socket.sendto("\n".join(lines).encode(), self._target)
        except OSError as exc:
            self._fail(str(exc))
            return False
        return True

    def close(self) -> None:
        """Close the socket; later sends do nothing."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _fail(self, reason: str) -> None:
        if not self._failed:
            self._failed = True
            logger.warning(
                "cannot notify the service manager at NOTIFY_SOCKET=%s: %s "
                "(later failures are not logged)",
                self.address,
                reason,
            )


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings asked for by ``$WATCHDOG_USEC``, or None."""
    text = os.environ.get("WATCHDOG_USEC", "").strip()
    if not text:
        return None
    pid = os.environ.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process
    try:
        usec = int(text)
    except ValueError:
        usec = 0
    if usec <= 0:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", text)
        return None
    return usec / 2e6


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def serve_notify(
    supervisor: Supervisor,
    *,
    address: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report *supervisor*'s life to systemd until it stopped (or until cancelled).

    *address* defaults to ``$NOTIFY_SOCKET``; when there is none this returns at once
    and costs nothing. Start it before the supervisor runs, so that it sees the start::

        async with trio.open_nursery() as nursery:
            await nursery.start(nd.serve_notify, sup)
            await nursery.start(sup.serve)

    :func:`nursery_down.run` does this for you.
    """
    address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
    if not address:
        task_status.started()
        return
    interval = watchdog_interval()
    with Notifier(address) as notifier, supervisor.subscribe() as events:
        reporter = _Reporter(supervisor, notifier)
        try:
            async with trio.open_nursery() as nursery:
                if interval is not None:
                    nursery.start_soon(_ping_watchdog, notifier, interval)
                nursery.start_soon(reporter.tick, STATUS_INTERVAL)
                task_status.started()
                async for event in events:
                    reporter.on_event(event)
                # The supervisor stopped: every event was reported.
                nursery.cancel_scope.cancel()
        finally:
            # Cancelled (the program is ending): the last events are still worth sending.
            for event in events.drain_nowait():
                reporter.on_event(event)


async def _ping_watchdog(notifier: Notifier, interval: float) -> None:
    # A trio task on purpose: if the loop is stuck in a blocking call, no ping goes out.
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


class _Reporter:
    """Turns supervisor events into notify messages."""

    def __init__(self, supervisor: Supervisor, notifier: Notifier) -> None:
        self._supervisor = supervisor
        self._notifier = notifier
        self._status: str | None = None
        self._ready = False
        self._reloading = False
        self._stopping = False
        self._extended_to = -math.inf  # wall clock up to which systemd waits, as sent

    def on_event(self, event: Event) -> None:
        if event.kind == "signal":
            return  # the action it causes has its own event
        lines: list[str] = []
        rolling = event.detail.get("rolling_restart") if event.kind == "app" else None
        if rolling is True and not self._reloading and not self._stopping:
            self._reloading = True
            lines += ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        elif rolling is False and self._reloading:
            self._reloading = False
            if not self._stopping:
                lines.append("READY=1")
        self._report(lines)

    async def tick(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self._report([])

    def _report(self, lines: list[str]) -> None:
        snapshot = self._supervisor.snapshot(max_jobs=0)
        # From the state, not from the event that announced it: the events before it
        # (the action that asked for a drain, say) are reported after the change.
        state = snapshot["state"]
        if state == "running" and not self._ready:
            self._ready = True
            lines.insert(0, "READY=1")
        elif state in ("draining", "stopped") and not self._stopping:
            self._stopping = True
            self._reloading = False
            lines.insert(0, "STOPPING=1")
        status = status_line(snapshot, reloading=self._reloading)
        if lines or status != self._status:
            lines.append(f"STATUS={status}")
            self._status = status
        extend = self._extension(snapshot)
        if extend is not None:
            lines.append(f"EXTEND_TIMEOUT_USEC={extend}")
        self._notifier.send(*lines)

    def _extension(self, snapshot: dict[str, Any]) -> int | None:
        """Microseconds systemd should wait for the drain, if more than already asked."""
        if snapshot["state"] != "draining" or snapshot["grace_deadline"] is None:
            return None
        in_flight = sum(s["in_flight"] for s in snapshot["services"])
        if not in_flight and snapshot["pre_drain_until"] is None:
            return None  # nothing left that needs the grace: the drain ends at once
        now = time.time()
        grace_deadline: float = snapshot["grace_deadline"]
        if grace_deadline <= now:
            return None
        # Up to the grace deadline plus the stop margin, never further: a drain that
        # outlives its own grace is what the outer timeout exists for.
        target = grace_deadline + STOP_MARGIN_PER_SERVICE * len(snapshot["services"])
        if target <= self._extended_to + STATUS_INTERVAL:
            return None  # asked for already (an extend_grace moves it further)
        self._extended_to = target
        return math.ceil((target - now) * 1e6)


def status_line(snapshot: dict[str, Any], *, reloading: bool = False) -> str:
    """The ``STATUS=`` text: ``running: 3/3 services up, 7 jobs in flight``."""
    state = snapshot["state"]
    services = snapshot["services"]
    if state == "stopped":
        return f"stopped: exit code {snapshot['exit_code']}"
    up = sum(1 for s in services if s["state"] == "running")
    in_flight = sum(s["in_flight"] for s in services)
    jobs = "1 job in flight" if in_flight == 1 else f"{in_flight} jobs in flight"
    counts = f"{up}/{len(services)} services up, {jobs}"
    if state == "draining":
        now = time.time()
        until = snapshot["pre_drain_until"]
        if until is not None:
            return f"draining: still serving for {max(0.0, until - now):.0f} s; {counts}"
        deadline = snapshot["grace_deadline"]
        left = "" if deadline is None else f", hard-cancel in {max(0.0, deadline - now):.0f} s"
        return f"draining: {counts}{left}"
    if reloading:
        return f"restarting every service in turn: {counts}"
    return f"{state}: {counts}"
