"""The in-flight registry: shielded job blocks, their counts, ages and deadlines."""

from __future__ import annotations

import math
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import trio

from ._exceptions import DrainingError

if TYPE_CHECKING:
    from ._drain import Drain, ShieldHost

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

    A job block in a task that does not run under the service (a request handler
    in the program's own nursery) is cut the same way at the deadline, but nothing
    above it is cancelled: the block ends and execution goes on after it, so check
    :attr:`outcome` there before acting as though the job had finished.
    """

    __slots__ = (
        "_counters",
        "_drain",
        "_host",
        "_scope",
        "_service",
        "_task",
        "info",
        "key",
        "outcome",
        "started",
    )

    def __init__(
        self,
        drain: Drain,
        counters: JobCounters,
        service: str,
        key: Hashable,
        info: dict[str, Any],
    ) -> None:
        self._drain = drain
        self._counters = counters
        self._service = service
        self._scope: trio.CancelScope | None = None
        self._host: ShieldHost | None = None
        self._task: trio.lowlevel.Task | None = None
        #: The key given to ``ctx.job()``, shown on the dashboard.
        self.key = key
        #: The keyword arguments given to ``ctx.job()``, shown on the dashboard.
        self.info = info
        #: ``trio.current_time()`` when the block was entered.
        self.started = math.nan
        #: How the block ended, or ``"running"`` while it runs.
        self.outcome: JobOutcome = "running"

    @property
    def task(self) -> trio.lowlevel.Task | None:
        """The trio task the block runs in (where it waits: ``Supervisor.job_stack``)."""
        return self._task

    @property
    def deadline(self) -> float:
        """The trio time at which this job is hard-cancelled (``inf`` until a drain begins)."""
        return self._scope.deadline if self._scope is not None else math.inf

    async def __aenter__(self) -> Job:
        drain = self._drain
        if drain.draining and not drain.take_late_admission():
            raise DrainingError(
                f"service {self._service!r} is draining, so job {self.key!r} cannot start; "
                "take work through ctx.intake(), which stops handing out items when a "
                "drain begins, or check ctx.draining first"
            )
        # Each job is shielded: only its deadline, which stays at infinity until a
        # drain sets it to the grace deadline, can cancel it. A task that runs in a
        # scope of ours for its whole life lends that scope as the shield, which
        # costs a fraction of entering a new one (see ShieldHost).
        task = trio.lowlevel.current_task()
        host = drain.shield_hosts.get(task)
        if host is not None and host.lend(task, drain.deadline):
            self._host = host
            scope = host.scope
        else:
            scope = trio.CancelScope(shield=True, deadline=drain.deadline)
            scope.__enter__()
            drain.job_scopes.add(scope)
        self._scope = scope
        self._task = task
        self.started = drain.now()
        self._counters.in_flight[self] = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        counters = self._counters
        del counters.in_flight[self]
        report = self._drain.report
        if report is not None:  # a drain under way: it reads the outcome when it ends
            report.job_ended(self)
        scope = self._scope
        assert scope is not None
        host = self._host
        if host is None:
            self._drain.job_ended(scope)
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
            self.outcome = "hard_cancelled"
            counters.hard_cancelled += 1
            if host is not None:
                # The Cancelled carries on to the lent scope, which shares the deadline
                # and absorbs it: the code after the block must not run as if the job
                # had finished.
                return False
            # The same holds for a scope of the service around this task (a worker
            # in the service's own nursery): it is cancelled by the same deadline and
            # absorbs the Cancelled. Outside the service's task tree (a request
            # handler of the program's own, say) nothing above asked for a
            # cancellation: the block ends like ``move_on_at`` and ``outcome`` says
            # it was cut, so nothing else is disturbed.
            return trio.current_effective_deadline() > trio.current_time()
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
