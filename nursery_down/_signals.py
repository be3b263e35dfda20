"""SIGTERM, SIGINT and SIGHUP turned into supervisor actions."""

from __future__ import annotations

import signal

import trio

from ._exceptions import ConfigurationError
from ._supervisor import Supervisor

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def serve_signals(
    supervisor: Supervisor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Own SIGTERM, SIGINT and SIGHUP until cancelled, and drive *supervisor* with them.

    - first SIGTERM or SIGINT: drain the whole app in stop order;
    - another one during that drain: escalate (hard-cancel in-flight jobs now);
    - SIGHUP: restart every service in turn; the process stays up.

    While this runs, SIGINT arrives here and never as KeyboardInterrupt, so Ctrl-C
    cannot tear through a shielded job.
    """
    try:
        receiver = trio.open_signal_receiver(*HANDLED_SIGNALS)
    except RuntimeError as exc:  # not the main thread of the main interpreter
        raise ConfigurationError(
            f"cannot handle signals here ({exc}); run from the main thread, or pass "
            "handle_signals=False and drive the supervisor yourself"
        ) from None
    with receiver as signals:
        task_status.started()
        async for signum in signals:
            dispatch_signal(supervisor, signum)


def dispatch_signal(supervisor: Supervisor, signum: int) -> None:
    """Apply one signal to *supervisor* (what :func:`serve_signals` does for each)."""
    if not supervisor.running:
        return
    name = signal.Signals(signum).name
    supervisor._publish_signal(name)
    actor = f"signal {name}"
    if signum == signal.SIGHUP:
        if not supervisor.draining:
            supervisor._action("restart", None, actor)
            supervisor._begin_rolling_restart()
    elif supervisor.draining:
        supervisor._action("escalate", None, actor)
        supervisor._escalate_app()
    else:
        supervisor._action("drain", None, actor)
        supervisor._begin_app_drain(None)
