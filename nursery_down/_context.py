"""ServiceContext: what a service function receives."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable
from typing import Any, Generic, TypeVar

import trio

from ._drain import Drain
from ._events import EventHub
from ._exceptions import ConfigurationError
from ._health import HealthBoard
from ._jobs import Job, JobCounters
from ._validate import is_async_function, is_count
from ._workers import Worker, WorkerGroup

T = TypeVar("T")

#: Called with an item that was taken from a source after the drain began, so that
#: it can go back to that source. May be a plain or an async function.
ReleaseFunction = Callable[[Any], Any]


class ServiceContext:
    """What a service function receives: readiness, intake, job blocks and drain state.

    A new context is made each time the service starts (including restarts)::

        async def consumer(ctx: nd.ServiceContext) -> None:
            ctx.ready()
            async for msg in ctx.intake(receive_channel):
                async with ctx.job(msg.id, topic="orders"):
                    await handle(msg)
    """

    def __init__(
        self,
        name: str,
        drain: Drain,
        counters: JobCounters,
        on_ready: Callable[[ServiceContext], None],
        health: HealthBoard | None = None,
        known: Callable[[str], None] | None = None,
    ) -> None:
        self._name = name
        # Whether this run of the service is draining, and until when: asked, never kept.
        self._drain = drain
        self._counters = counters
        self._on_ready = on_ready
        self._ready_called = False
        # Shared with the other services (one owner of every service's health).
        self._health_board = health if health is not None else HealthBoard(EventHub())
        self._known = known

    # -- what a service reads -----------------------------------------------------------

    @property
    def name(self) -> str:
        """The service's name."""
        return self._name

    @property
    def draining(self) -> bool:
        """True once a drain of this service began: take no new work."""
        return self._drain.draining

    @property
    def deadline(self) -> float:
        """The trio time at which in-flight jobs are hard-cancelled; ``inf`` until a drain."""
        return self._drain.deadline

    @property
    def health(self) -> str:
        """This service's health: ``"ok"`` unless it said otherwise (:meth:`set_health`)
        or its health check found otherwise."""
        return self._health_board.get(self._name).value

    def set_health(self, health: str, reason: str | None = None) -> None:
        """Report this service's own health: ``"ok"`` is healthy; anything else
        (``"degraded"``, ``"unhealthy"``...) is not, with *reason* saying why. Shown on
        the dashboard, in the timeline and ``/metrics``; ``/readyz`` answers 503 while
        a service is not healthy."""
        self._health_board.set(self._name, health, reason, by="the service")

    def health_of(self, service: str) -> str:
        """The health of another service (``"ok"``, ``"degraded"``...)."""
        if self._known is not None:
            self._known(service)
        return self._health_board.get(service).value

    async def wait_health(self, service: str, *, healthy: bool = True) -> str:
        """Wait until *service* is healthy (or, with ``healthy=False``, until it is
        not); return its health then. E.g. follow a dependency::

            while True:
                await ctx.wait_health("db", healthy=False)
                ctx.set_health("degraded", "db is unhealthy")
                await ctx.wait_health("db")
                ctx.set_health("ok")
        """
        if self._known is not None:
            self._known(service)
        return (await self._health_board.wait(service, healthy=healthy)).value

    def ready(self) -> None:
        """Say the service is up: STARTING -> RUNNING, and the next service may start.

        Calling it again, or after a drain began, does nothing.
        """
        if self._ready_called:
            return
        self._ready_called = True
        self._on_ready(self)

    async def wait_draining(self) -> None:
        """Wait until a drain of this service begins."""
        await self._drain.began.wait()

    # -- taking work ------------------------------------------------------------------

    def intake(
        self, source: AsyncIterable[T], *, release: ReleaseFunction | None = None
    ) -> AsyncIterator[T]:
        """Iterate over *source* until a drain begins; then stop at once.

        *source* is usually a ``trio.MemoryReceiveChannel``: the iterator reads its own
        clone of the channel and the drain closes that clone, which wakes a blocked
        receive instantly and costs nothing per item. Items still in the channel stay
        there for whoever reads it next. Any other async iterable works too.

        An item that arrives in the very instant the drain begins has already left
        its source. With *release*, it is handed to ``release(item)`` to go back;
        without, it is still yielded, and the job it starts runs under the grace
        deadline like the others, so it is never dropped.
        """
        if isinstance(source, trio.MemoryReceiveChannel):
            return _ChannelIntake(self, source, release)
        return _GenericIntake(self, source, release)

    def job(self, key: Hashable, **info: Any) -> Job:
        """An async context manager marking one unit of in-flight work.

        The block is counted and shown on the dashboard, and shielded: a drain lets
        it finish until the grace deadline, then hard-cancels it. Entering it after
        the drain began raises :class:`DrainingError`.
        """
        return Job(self._drain, self._counters, self._name, key, info)

    async def run_workers(self, count: int, worker: Worker, *args: Any) -> None:
        """Run *count* copies of ``worker(*args)`` at once; return when all have returned.

        The usual shape of a service that works on several items at a time::

            async def consumer(ctx: nd.ServiceContext) -> None:
                async def worker() -> None:
                    async for msg in ctx.intake(receive_channel):
                        async with ctx.job(msg.id):
                            await handle(msg)

                ctx.ready()
                await ctx.run_workers(20, worker)

        It behaves like starting the workers in a nursery of your own: if one raises,
        the others are cancelled (a job in flight still finishes first, shielded) and
        the error propagates. It is cheaper per job, though. Each worker runs in a
        cancel scope of its own for its whole life, and a ``ctx.job()`` block directly
        in the worker uses that scope as its shield instead of entering a new one,
        which costs about as much as a trivial job. (A job block directly in the
        service function uses the service's scope the same way.)

        A job block that sits inside a nursery or a timeout the worker opened itself
        takes a scope of its own, so it is shielded from those too, exactly as in any
        other task. One difference remains: a cancel scope without a deadline that
        the worker opens around the block and later cancels by hand does reach the job.
        """
        if not is_count(count):
            raise ConfigurationError(
                f"run_workers needs a whole number >= 1 of workers, got {count!r}"
            )
        if not is_async_function(worker):
            raise ConfigurationError(
                f"run_workers' worker {getattr(worker, '__name__', worker)!r} must be an "
                "async function (define it with 'async def')"
            )
        group = WorkerGroup(self._drain, count)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(group.watch, name=f"{self.name} workers' watcher")
            for index in range(count):
                nursery.start_soon(group.host, worker, args, name=f"{self.name} worker {index}")


class _IntakeBase(Generic[T]):
    def __init__(self, context: ServiceContext, release: ReleaseFunction | None) -> None:
        self._context = context
        self._release = release

    def __aiter__(self) -> AsyncIterator[T]:
        return self  # type: ignore[return-value]  # subclasses define __anext__

    async def _late(self, item: T) -> T:
        """An item received in the same instant a drain began."""
        if self._release is None:
            self._context._drain.admit_late_item()
            return item
        result = self._release(item)
        if inspect.isawaitable(result):
            await result
        raise StopAsyncIteration


class _ChannelIntake(_IntakeBase[T]):
    def __init__(
        self,
        context: ServiceContext,
        channel: trio.MemoryReceiveChannel[T],
        release: ReleaseFunction | None,
    ) -> None:
        super().__init__(context, release)
        self._drain = context._drain
        self._clone: trio.MemoryReceiveChannel[T] | None = None
        if not self._drain.draining:
            self._clone = channel.clone()
            self._drain.add_intake_clone(self._clone)

    async def __anext__(self) -> T:
        clone = self._clone
        if self._drain.draining or clone is None:
            raise StopAsyncIteration
        try:
            item = await clone.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._finish()
            raise StopAsyncIteration from None
        if self._context.draining:
            return await self._late(item)
        return item

    def _finish(self) -> None:
        if self._clone is not None:
            self._drain.discard_intake_clone(self._clone)
            self._clone.close()
            self._clone = None


class _GenericIntake(_IntakeBase[T]):
    def __init__(
        self,
        context: ServiceContext,
        source: AsyncIterable[T],
        release: ReleaseFunction | None,
    ) -> None:
        super().__init__(context, release)
        self._iterator = aiter(source)

    async def __anext__(self) -> T:
        drain = self._context._drain
        if drain.draining:
            raise StopAsyncIteration
        # An arbitrary iterable cannot be woken from outside, so each wait runs in a
        # scope that the drain cancels. (Memory channels take the cheaper path above.)
        with trio.CancelScope() as scope:
            drain.add_intake_scope(scope)
            try:
                item = await anext(self._iterator)
            finally:
                drain.discard_intake_scope(scope)
        if scope.cancelled_caught:
            raise StopAsyncIteration
        if self._context.draining:
            return await self._late(item)
        return item
