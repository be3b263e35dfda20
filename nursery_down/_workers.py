"""Worker tasks whose cancel scope serves the job blocks in them as their shield.

Entering a trio cancel scope costs about as much as a trivial job. A task that runs
in a scope of ours for its whole life (a worker started by ``ctx.run_workers``, or
a service function's own task) lends that scope to each job block entered directly
in it instead: the job is shielded just the same, for a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._context import ServiceContext

Worker = Callable[..., Awaitable[object]]


class ShieldHost:
    """The cancel scope one task runs in for its whole life, lent to its job blocks."""

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

        *deadline* is the service's grace deadline, which the scope always carries.
        The scope cannot serve when something the task opened itself sits between it
        and the block, because that thing's cancellation would reach the job: a
        nursery (the task lists it), a timeout or an already cancelled scope (the
        effective deadline, read with the shield up, is then not the scope's own).
        A job nested in another job cannot use it either. The block then enters a
        scope of its own.
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


class WorkerGroup:
    """The workers of one ``ctx.run_workers`` call.

    Each worker's scope stays shielded between jobs too, which saves raising and
    lowering the shield around every job. That is safe only while nothing outside
    wants the workers gone: a drain stops them through their intake and a grace
    deadline through their scopes' deadline, but a crashing worker or an outside
    cancellation cancels the group's nursery, and a shielded idle worker would not
    notice. So a watcher task waits in that nursery; when it is cancelled, it lifts
    the shields of the idle workers (a busy one's shield goes when its job ends).
    That takes one scheduling step, in which an idle worker may still take an item
    and run it as a job: started after the cancellation, but never lost.
    """

    def __init__(self, context: ServiceContext, count: int) -> None:
        self._context = context
        self._live = count
        self._hosts: set[ShieldHost] = set()
        self._lifted = False
        self._all_returned = trio.CancelScope()

    async def watch(self) -> None:
        with self._all_returned:
            try:
                await trio.sleep_forever()
            finally:
                if not self._all_returned.cancel_called:
                    self._lifted = True
                    for host in self._hosts:
                        host.lift()

    async def host(self, worker: Worker, args: tuple[Any, ...]) -> None:
        context = self._context
        task = trio.lowlevel.current_task()
        shielded = not self._lifted
        with trio.CancelScope(shield=shielded, deadline=context._deadline) as scope:
            host = ShieldHost(scope, keep_shield=shielded)
            context._shield_hosts[task] = host
            self._hosts.add(host)
            try:
                await worker(*args)
            finally:
                context._shield_hosts.pop(task, None)
                self._hosts.discard(host)
                self._live -= 1
                if not self._live:
                    self._all_returned.cancel()
