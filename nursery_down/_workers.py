"""The workers of ``ctx.run_workers``: tasks whose cancel scope shields their job blocks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._drain import Drain, ShieldHost

Worker = Callable[..., Awaitable[object]]


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

    def __init__(self, drain: Drain, count: int) -> None:
        self._drain = drain
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
        drain = self._drain
        task = trio.lowlevel.current_task()
        shielded = not self._lifted
        with trio.CancelScope(shield=shielded, deadline=drain.deadline) as scope:
            host = ShieldHost(scope, keep_shield=shielded)
            drain.shield_hosts[task] = host
            self._hosts.add(host)
            try:
                await worker(*args)
            finally:
                drain.shield_hosts.pop(task, None)
                self._hosts.discard(host)
                self._live -= 1
                if not self._live:
                    self._all_returned.cancel()
        if scope.cancelled_caught:  # only the grace deadline cancels this scope
            drain.worker_cut = True
