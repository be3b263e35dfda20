"""The in-flight registry: shielded job blocks, their counts, ages and deadlines."""

from __future__ import annotations

import math
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import trio

from ._exceptions import DrainingError

if TYPE_CHECKING:
    from ._context import ServiceContext
    from ._workers import ShieldHost

JobOutcome = Literal["running", "completed", "failed", "hard_cancelled"]


class JobCounters:
    """Totals for one service across all of its restarts, and the jobs in flight now."""

    __slots__ = ("completed", "failed", "hard_cancelled", "in_flight")

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.hard_cancelled = 0
        self.in_flight: dict[Job, None] = {}  # insertion-ordered: oldest first

    def oldest_age(self, now: float) -> float | None:
        for job in self.in_flight:
            return now - job.started
        return None


class Job:
    """One unit of in-flight work: the value of ``async with ctx.job(key) as job``.

    While the block runs it is shielded from outside cancellation: neither a drain
    nor a crashing sibling task can cut it. Only the service's grace deadline can,
    after a drain began; then the block is cancelled, :attr:`outcome` becomes
    ``"hard_cancelled"`` and the cancellation carries on out of the block, so code
    after it (an ack, say) does not run as though the job had finished.
    """

    __slots__ = ("_context", "_host", "_scope", "info", "key", "outcome", "started")

    def __init__(self, context: ServiceContext, key: Hashable, info: dict[str, Any]) -> None:
        self._context = context
        self._scope: trio.CancelScope | None = None
        self._host: ShieldHost | None = None
        #: The key given to ``ctx.job()``, shown on the dashboard.
        self.key = key
        #: The keyword arguments given to ``ctx.job()``, shown on the dashboard.
        self.info = info
        #: ``trio.current_time()`` when the block was entered.
        self.started = math.nan
        #: How the block ended, or ``"running"`` while it runs.
        self.outcome: JobOutcome = "running"

    @property
    def deadline(self) -> float:
        """The trio time at which this job is hard-cancelled (``inf`` until a drain begins)."""
        return self._scope.deadline if self._scope is not None else math.inf

    def _set_deadline(self, deadline: float) -> None:
        if self._scope is not None:
            self._scope.deadline = deadline

    async def __aenter__(self) -> Job:
        context = self._context
        if context._draining and not context._admit_late_item():
            raise DrainingError(
                f"service {context.name!r} is draining, so job {self.key!r} cannot start; "
                "take work through ctx.intake(), which stops handing out items when a "
                "drain begins, or check ctx.draining first"
            )
        # Each job is shielded: only its deadline, which stays at infinity until a
        # drain sets it to the grace deadline, can cancel it. A task that runs in a
        # scope of ours for its whole life lends that scope as the shield, which
        # costs a fraction of entering a new one (see _workers).
        task = trio.lowlevel.current_task()
        host = context._shield_hosts.get(task)
        if host is not None and host.lend(task, context._deadline):
            self._host = host
            scope = host.scope
        else:
            scope = trio.CancelScope(shield=True, deadline=context._deadline)
            scope.__enter__()
        self._scope = scope
        self.started = context._now()
        context._counters.in_flight[self] = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        counters = self._context._counters
        del counters.in_flight[self]
        scope = self._scope
        assert scope is not None
        host = self._host
        if host is None:
            try:
                scope.__exit__(exc_type, exc, tb)
            except BaseException:
                self.outcome = "failed"
                counters.failed += 1
                raise
            hard_cancelled = scope.cancelled_caught
        else:
            host.give_back()
            hard_cancelled = exc is not None and scope.cancel_called and _is_cancellation(exc)
        if hard_cancelled:
            # The grace deadline passed. Returning False lets the Cancelled carry on
            # to the scope that shares that deadline (the service's own, or the
            # worker's): the code after the block must not run as if the job had
            # finished.
            self.outcome = "hard_cancelled"
            counters.hard_cancelled += 1
            return False
        if exc is None:
            self.outcome = "completed"
            counters.completed += 1
        else:
            self.outcome = "failed"
            counters.failed += 1
        return False


def _is_cancellation(exc: BaseException | None) -> bool:
    """True for a Cancelled, or a group of nothing but Cancelled."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False
