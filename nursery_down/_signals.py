"""SIGTERM, SIGINT, SIGHUP and SIGUSR2 turned into supervisor actions."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Literal

import trio

from ._exceptions import ConfigurationError, NurseryDownError
from ._supervisor import Supervisor

logger = logging.getLogger("nursery_down")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)

#: What SIGHUP does: restart every service in this process, or upgrade the program.
HupAction = Literal["restart", "upgrade"]


async def serve_signals(
    supervisor: Supervisor,
    *,
    on_hup: HupAction = "restart",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own SIGTERM, SIGINT, SIGHUP and SIGUSR2 until cancelled; drive *supervisor* with them.

    - first SIGTERM or SIGINT: drain the whole app in stop order;
    - another one during that drain: escalate (hard-cancel in-flight jobs now);
    - SIGHUP: restart every service (stop in stop order, start in start order); the
      process stays up. During start-up it waits until start-up is over. With
      ``on_hup="upgrade"``, SIGHUP upgrades instead, like SIGUSR2;
    - SIGUSR2: upgrade: start the next generation of the program, hand it the
      listening sockets, then drain this one (only under :func:`nursery_down.run`).

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
    if on_hup not in ("restart", "upgrade"):
        raise ConfigurationError(f"on_hup must be 'restart' or 'upgrade', got {on_hup!r}")
    with receiver as signals:
        async with trio.open_nursery() as upgrades:

            def upgrade(actor: str) -> None:
                upgrades.start_soon(_upgrade, supervisor, actor)

            task_status.started()
            # Signals that arrived before the receiver opened were held, not lost.
            while _held:
                dispatch_signal(supervisor, _held.pop(0), on_hup=on_hup, upgrade=upgrade)
            async for signum in signals:
                dispatch_signal(supervisor, signum, on_hup=on_hup, upgrade=upgrade)


async def _upgrade(supervisor: Supervisor, actor: str) -> None:
    try:
        await supervisor.upgrade(actor=actor)
    except NurseryDownError as exc:  # refused, or the new generation failed: logged
        logger.warning("%s: %s", actor, exc)


_held: list[int] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


@contextmanager
def holding_signals() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP while no receiver owns them.

    Around the whole run: a signal that arrives before :func:`serve_signals` opened
    its receiver is replayed to it, and one that arrives after the receiver closed
    (while the program is already exiting) is ignored, instead of killing the
    process with the default action or raising KeyboardInterrupt.
    """
    previous = {signum: signal.signal(signum, _hold) for signum in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _held.clear()


def ignore_signals_until_exit() -> None:
    """Ignore SIGTERM, SIGINT, SIGHUP and SIGUSR2 from now on: the program is over.

    For :func:`nursery_down.run` once the run is over, while the interpreter shuts
    down (tens to hundreds of milliseconds): a late signal, such as a deploy's second
    SIGTERM or a second Ctrl-C, must not turn a clean exit into a death by signal or
    a KeyboardInterrupt traceback.
    """
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def dispatch_signal(
    supervisor: Supervisor,
    signum: int,
    *,
    on_hup: HupAction = "restart",
    upgrade: Callable[[str], None] | None = None,
) -> None:
    """Apply one signal to *supervisor* (what :func:`serve_signals` does for each).

    A signal is honoured at any instant before the supervisor stopped: one that
    arrives before its services run is applied the moment they do.
    """
    if supervisor.app_state == "stopped":
        return
    name = signal.Signals(signum).name
    supervisor._publish_signal(name)
    actor = f"signal {name}"
    if signum == signal.SIGUSR2 or (signum == signal.SIGHUP and on_hup == "upgrade"):
        if upgrade is None:
            logger.warning("%s ignored: this program cannot upgrade itself here", name)
        else:
            upgrade(actor)
    elif signum == signal.SIGHUP:
        if not supervisor.draining:
            supervisor.restart_nowait(actor=actor)
    elif supervisor.draining:
        supervisor.escalate_nowait(actor=actor)
    else:
        supervisor.drain_nowait(actor=actor)
