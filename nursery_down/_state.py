"""The service lifecycle: states and the transitions allowed between them.

Everything that decides whether a state change is legal lives here, as data.
The supervisor changes a service's state only through :func:`check_transition`.
"""

from __future__ import annotations

import enum

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


S = ServiceState

#: Every legal change of state. Anything else is a bug in the supervisor.
TRANSITIONS: frozenset[tuple[ServiceState, ServiceState]] = frozenset(
    {
        (S.STOPPED, S.STARTING),  # start
        (S.FAILED, S.STARTING),  # an operator starts a failed service again
        (S.STARTING, S.RUNNING),  # ctx.ready()
        (S.STARTING, S.DRAINING),  # drain before it became ready
        (S.STARTING, S.STOPPED),  # returned before ready, not restarted
        (S.STARTING, S.BACKOFF),  # crashed while starting, will restart
        (S.STARTING, S.FAILED),  # crashed while starting, will not restart
        (S.RUNNING, S.DRAINING),  # drain
        (S.RUNNING, S.STOPPED),  # returned by itself, not restarted
        (S.RUNNING, S.BACKOFF),  # crashed (or returned, if permanent), will restart
        (S.RUNNING, S.FAILED),  # crashed, will not restart
        (S.DRAINING, S.STOPPED),  # drained
        (S.DRAINING, S.FAILED),  # crashed while draining
        (S.BACKOFF, S.STARTING),  # backoff over
        (S.BACKOFF, S.STOPPED),  # drained while waiting to restart
    }
)

#: States in which the service's function is running (or about to run again).
ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.DRAINING, S.BACKOFF})


def check_transition(service: str, current: ServiceState, target: ServiceState) -> None:
    """Raise :class:`InvalidTransitionError` unless *current* -> *target* is in the table."""
    if (current, target) not in TRANSITIONS:
        raise InvalidTransitionError(
            f"service {service!r} cannot go from {current.value} to {target.value}"
        )
