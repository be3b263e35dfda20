"""Drain: the one owner of a service incarnation's drain.

Each run of a service function (its first start and every restart) gets one
:class:`Drain`. It alone holds whether the drain began and the grace deadline, and
it alone writes that deadline into every cancel scope that carries it: the service's
own scope, the scope of each long-lived worker task (lent to the job blocks in it as
their shield), and the scope of each job block that entered a scope of its own. The
intake iterators, the job blocks and the workers ask it; the supervisor tells it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._reports import ServiceDrainReport


class ShieldHost:
    """The cancel scope one task runs in for its whole life, lent to its job blocks.

    Entering a trio cancel scope costs about as much as a trivial job. A task that
    runs in a scope of ours for its whole life (a worker started by
    ``ctx.run_workers``, or a service function's own task) lends that scope to each
    job block entered directly in it instead: the job is shielded just the same, for
    a fraction of the cost.
    """

    __slots__ = ("busy", "keep_shield", "scope")

    def __init__(self, scope: trio.CancelScope, *, keep_shield: bool) -> None:
        self.scope = scope
        #: True while a job block holds the scope as its shield.
        self.busy = False
        #: True while the scope stays shielded between jobs too (see WorkerGroup);
        #: the scope is shielded whenever this is true.
        self.keep_shield = keep_shield

    def lend(self, task: trio.lowlevel.Task, deadline: float) -> bool:
        """Shield the scope for one job block entered directly in *task*, if it can.

        *deadline* is the grace deadline, which the scope always carries. The scope
        cannot serve when something the task opened itself sits between it and the
        block, because that thing's cancellation would reach the job: a nursery (the
        task lists it), a timeout or an already cancelled scope (the effective
        deadline, read with the shield up, is then not the scope's own). A job nested
        in another job cannot use it either. The block then enters a scope of its own.
        """
        if self.busy or task.child_nurseries:
            return False
        if self.keep_shield:  # shielded already
            if trio.current_effective_deadline() != deadline:
                return False
        else:
            self.scope.shield = True
            if trio.current_effective_deadline() != deadline:
                self.scope.shield = False
                return False
        self.busy = True
        return True

    def give_back(self) -> None:
        """The job block ended."""
        self.busy = False
        if not self.keep_shield:
            self.scope.shield = False

    def lift(self) -> None:
        """Stop shielding between jobs: outside cancellation reaches the idle task again."""
        self.keep_shield = False
        if not self.busy:
            self.scope.shield = False


class Drain:
    """Whether one service incarnation is draining, and until when its work may run.

    Made by the supervisor for each run of the service function, together with the
    service's cancel scope. Nothing else sets the deadline: :meth:`begin` starts the
    drain, :meth:`move_deadline` tightens or extends it, and every scope that carries
    the deadline is updated from here in the same instant.
    """

    def __init__(self) -> None:
        #: The service function's own cancel scope: at the deadline, whatever still
        #: runs in the service stops, not only the job blocks.
        self.scope = trio.CancelScope()
        #: True once the drain began: take no new work.
        self.draining = False
        #: The trio time at which in-flight work is cut; ``inf`` until a drain.
        self.deadline = math.inf
        #: Set when the drain begins (``ctx.wait_draining()``).
        self.began = trio.Event()
        #: The long-lived tasks whose scopes are lent to job blocks (see ShieldHost).
        self.shield_hosts: dict[trio.lowlevel.Task, ShieldHost] = {}
        #: The scopes of job blocks that entered a scope of their own.
        self.job_scopes: set[trio.CancelScope] = set()
        self._jobs_done: trio.Event | None = None
        # Channel clones read by intake iterators: closed by the drain, which wakes
        # a blocked receive at once and costs nothing per item.
        self._intake_clones: set[trio.MemoryReceiveChannel[Any]] = set()
        # Scopes around receives from other iterables, cancelled by the drain.
        self._intake_scopes: set[trio.CancelScope] = set()
        # Items received in the very instant the drain began, allowed to start a job.
        self._late_admissions = 0
        # True when the start was called off: the service scope was cancelled on
        # purpose, and that cut no work.
        self._start_abandoned = False
        #: True once a long-lived worker scope was cut by the deadline.
        self.worker_cut = False
        #: The clock's own method: trio.current_time() looks the clock up on each call.
        self.now = trio.lowlevel.current_clock().current_time
        #: The report of the drain under way (None until it begins, and once it is
        #: told): each job in flight tells it how it ended.
        self.report: ServiceDrainReport | None = None

    # -- told by the supervisor ------------------------------------------------------

    def begin(self, deadline: float) -> None:
        """Begin the drain: intake stops now; work may run until *deadline*."""
        if self.draining:
            self.move_deadline(min(deadline, self.deadline))
            return
        self.draining = True
        self.began.set()
        for clone in self._intake_clones:
            clone.close()
        self._intake_clones.clear()
        for scope in self._intake_scopes:
            scope.cancel()
        self.move_deadline(deadline)

    def abandon_start(self) -> None:
        """Call off a start that has not become ready: cancel the function now.

        Job blocks already in flight keep their shield and the grace deadline.
        """
        if self.job_scopes or any(host.busy for host in self.shield_hosts.values()):
            return
        self._start_abandoned = True
        self.scope.cancel()

    def move_deadline(self, deadline: float) -> None:
        """Set the grace deadline of everything in flight (extend or escalate)."""
        self.deadline = deadline
        self.scope.deadline = deadline
        # Worker scopes carry the deadline whether or not a job runs in them now: a
        # job that uses one as its shield relies on that scope's deadline alone.
        for host in self.shield_hosts.values():
            host.scope.deadline = deadline
        for scope in self.job_scopes:
            scope.deadline = deadline

    @property
    def cut(self) -> bool:
        """True if the deadline cut anything in the service: a job or other work."""
        return self.worker_cut or (self.scope.cancelled_caught and not self._start_abandoned)

    def close(self) -> None:
        """The service function ended: its intake iterators end too."""
        self.shield_hosts.clear()
        for clone in self._intake_clones:
            clone.close()
        self._intake_clones.clear()

    async def wait_jobs_done(self) -> None:
        """Wait until no job block with a scope of its own is in flight.

        The service function has returned by then; what is left are job blocks in
        tasks that do not run under the service (a request handler of the program's
        own, say). The run ends only when they have ended too, within the grace.
        """
        if self.job_scopes:
            self._jobs_done = trio.Event()
            await self._jobs_done.wait()

    # -- asked by intake iterators and job blocks --------------------------------------

    def job_ended(self, scope: trio.CancelScope) -> None:
        """A job block that entered *scope* of its own ended."""
        self.job_scopes.discard(scope)
        if not self.job_scopes and self._jobs_done is not None:
            self._jobs_done.set()

    def add_intake_clone(self, clone: trio.MemoryReceiveChannel[Any]) -> None:
        self._intake_clones.add(clone)

    def discard_intake_clone(self, clone: trio.MemoryReceiveChannel[Any]) -> None:
        self._intake_clones.discard(clone)

    def add_intake_scope(self, scope: trio.CancelScope) -> None:
        self._intake_scopes.add(scope)

    def discard_intake_scope(self, scope: trio.CancelScope) -> None:
        self._intake_scopes.discard(scope)

    def admit_late_item(self) -> None:
        """An item was received in the instant the drain began: let one job start for it."""
        self._late_admissions += 1

    def take_late_admission(self) -> bool:
        """True (once per admitted item) if a job may still start during the drain."""
        if self._late_admissions:
            self._late_admissions -= 1
            return True
        return False
