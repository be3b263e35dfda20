"""The service lifecycle as data: states, what moves a service between them, and why.

Everything that decides a service's next state lives here (h11's rule): the table
of transitions keyed by (state, trigger), and :func:`after_exit`, the pure decision
of what follows when a service's function ends. Nothing here does I/O or knows a
clock, so both are tested exhaustively. The supervisor changes a state only through
:func:`next_state`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from ._exceptions import InvalidTransitionError


class ServiceState(enum.Enum):
    """Where a service is in its life. The values appear in snapshots and events."""

    #: Its function is running but has not called ``ctx.ready()`` yet.
    STARTING = "starting"
    #: Ready and taking work.
    RUNNING = "running"
    #: Taking no new work; in-flight jobs finish until the grace deadline.
    DRAINING = "draining"
    #: Not running: never started, finished, or drained. ``start()`` runs it again.
    STOPPED = "stopped"
    #: Crashed (or returned, if permanent) and waiting out its backoff before restarting.
    BACKOFF = "backoff"
    #: Crashed and will not be restarted: its policy forbids it or it restarted too often.
    FAILED = "failed"


class Trigger(enum.Enum):
    """What happened to a service; with its state, it decides the next state."""

    #: Its runner starts the function (first start, operator start, restart).
    START = "start"
    #: The function called ``ctx.ready()``.
    READY = "ready"
    #: A drain began (or, waiting in backoff, the restart was called off).
    DRAIN = "drain"
    #: The function ended and is not run again: returned, or drained.
    STOP = "stop"
    #: The function ended and runs again after a backoff.
    RESTART = "restart"
    #: The function crashed and is not run again.
    FAIL = "fail"
    #: The backoff is over.
    BACKOFF_OVER = "backoff_over"
    #: Something outside the service (the program ending) cancelled its runner.
    CANCEL = "cancel"


S = ServiceState
T = Trigger

#: Every legal change of state. Anything else is a bug in the supervisor.
TRANSITIONS: dict[tuple[ServiceState, Trigger], ServiceState] = {
    (S.STOPPED, T.START): S.STARTING,
    (S.FAILED, T.START): S.STARTING,  # an operator starts a failed service again
    (S.STARTING, T.READY): S.RUNNING,
    (S.STARTING, T.DRAIN): S.DRAINING,  # drained before it was ready: its start is called off
    (S.RUNNING, T.DRAIN): S.DRAINING,
    (S.BACKOFF, T.DRAIN): S.STOPPED,  # drained while waiting to restart
    (S.STARTING, T.STOP): S.STOPPED,  # returned before ready, not restarted
    (S.RUNNING, T.STOP): S.STOPPED,  # returned by itself, not restarted
    (S.DRAINING, T.STOP): S.STOPPED,  # drained
    (S.STARTING, T.RESTART): S.BACKOFF,
    (S.RUNNING, T.RESTART): S.BACKOFF,
    (S.STARTING, T.FAIL): S.FAILED,
    (S.RUNNING, T.FAIL): S.FAILED,
    (S.DRAINING, T.FAIL): S.FAILED,  # crashed while draining
    (S.BACKOFF, T.BACKOFF_OVER): S.STARTING,
    (S.STARTING, T.CANCEL): S.STOPPED,
    (S.RUNNING, T.CANCEL): S.STOPPED,
    (S.DRAINING, T.CANCEL): S.STOPPED,
    (S.BACKOFF, T.CANCEL): S.STOPPED,
}

#: States in which the service's function is running (or about to run again).
ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.DRAINING, S.BACKOFF})


def next_state(service: str, current: ServiceState, trigger: Trigger) -> ServiceState:
    """The state *trigger* moves *current* to; :class:`InvalidTransitionError` if none."""
    try:
        return TRANSITIONS[current, trigger]
    except KeyError:
        raise InvalidTransitionError(
            f"service {service!r} cannot {trigger.value} while {current.value}"
        ) from None


#: When a service whose function ended is started again:
#: ``"permanent"`` always, ``"transient"`` only after an error, ``"temporary"`` never.
RestartPolicy = Literal["permanent", "transient", "temporary"]


@dataclass(frozen=True, slots=True)
class ExitDecision:
    """What follows the end of a service's function: :func:`after_exit`'s answer."""

    #: STOP, RESTART (after a backoff) or FAIL.
    trigger: Trigger
    #: Why, for the event log: "drained", "crashed; restarting", ...
    reason: str


def after_exit(
    *,
    policy: RestartPolicy,
    error: str | None,
    draining: bool,
    cut: bool,
    recent_restarts: int,
    max_restarts: int,
    within: float,
) -> ExitDecision:
    """Decide what follows when a service's function ended. Pure: no clock, no I/O.

    *error* describes the exception it raised (None if it returned); *draining*: a
    drain of it had begun; *cut*: its grace deadline passed while it still ran;
    *recent_restarts*: how many restarts fell in the last *within* seconds.
    """
    if draining:
        if error is not None:
            return ExitDecision(T.FAIL, f"crashed while draining: {error}")
        return ExitDecision(T.STOP, "drained (grace deadline reached)" if cut else "drained")
    if error is None and policy != "permanent":
        return ExitDecision(T.STOP, "returned")
    if error is not None and policy == "temporary":
        return ExitDecision(T.FAIL, f"crashed (temporary: not restarted): {error}")
    what = "returned" if error is None else f"crashed: {error}"
    if recent_restarts >= max_restarts:
        return ExitDecision(
            T.FAIL, f"{what}; {recent_restarts} restarts within {within:g} s: giving up"
        )
    return ExitDecision(T.RESTART, what)
