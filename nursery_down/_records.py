"""ServiceRecord: what the supervisor keeps about one service across all of its runs."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import trio

from ._context import ServiceContext
from ._drain import Drain
from ._jobs import JobCounters
from ._spec import ServiceSpec
from ._state import ServiceState


@dataclass(eq=False)
class ServiceRecord:
    """One service: its definition, state, totals, and its current run (drain, context)."""

    spec: ServiceSpec
    state: ServiceState = ServiceState.STOPPED
    #: Wall-clock time of the last change of state.
    since: float = field(default_factory=time.time)
    counters: JobCounters = field(default_factory=JobCounters)
    restarts: int = 0
    #: Trio times of the restarts inside the restart-intensity window.
    recent_restarts: collections.deque[float] = field(default_factory=collections.deque)
    #: The current (or last) run's drain and context; None before the first start.
    drain: Drain | None = None
    context: ServiceContext | None = None
    backoff_scope: trio.CancelScope | None = None
    #: Set once the current start settled: ready, or ended before it was.
    settled: trio.Event = field(default_factory=trio.Event)
    last_error: str | None = None
    #: How many runs the grace deadline cut while work was still running.
    cut: int = 0
    #: Stopped on purpose by a per-service drain: the app keeps running without it.
    held: bool = False
    #: A restart of this one service is under way.
    restart_pending: bool = False
    #: True from launch until its runner task ended: never two runners at once.
    has_runner: bool = False
    #: The scope of its health checks while it is RUNNING (cancelled when it leaves).
    health_scope: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        return self.spec.name
