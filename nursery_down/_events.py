"""Event records and the hub that fans them out without ever blocking a publisher."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from ._closing import ClosesOnExit

#: ``state``: a service changed state. ``action``: someone asked for drain/start/...
#: ``signal``: the process received a signal. ``app``: the application as a whole changed.
#: ``health``: a service's health changed (``state`` is the new health, ``previous`` the old).
EventKind = Literal["state", "action", "signal", "app", "health"]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, as shown in the dashboard timeline and sent to subscribers."""

    seq: int
    time: float  # wall-clock seconds since the epoch
    kind: EventKind
    message: str
    service: str | None = None
    state: str | None = None
    previous: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-able data."""
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "message": self.message,
            "service": self.service,
            "state": self.state,
            "previous": self.previous,
            "detail": dict(self.detail),
        }


class EventHub:
    """Keeps the recent history and hands each event to every subscriber.

    :meth:`publish` is synchronous and O(subscribers): it never waits. A subscriber
    that falls more than *buffer* events behind skips ahead to the newest ones and is
    told how many it missed (:attr:`Subscription.skipped`).
    """

    def __init__(self, *, history: int = 500, buffer: int = 1000) -> None:
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._buffer = buffer
        self._subscriptions: set[Subscription] = set()
        self._seq = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, kind: EventKind, message: str, **fields: Any) -> Event:
        """Record an event and wake every subscriber; never blocks."""
        self._seq += 1
        event = Event(seq=self._seq, time=time.time(), kind=kind, message=message, **fields)
        self._history.append(event)
        for subscription in self._subscriptions:
            subscription._push(event)
        return event

    def history(self) -> list[Event]:
        """The most recent events, oldest first."""
        return list(self._history)

    def subscribe(self) -> Subscription:
        """A new subscription that receives every event published from now on."""
        subscription = Subscription(self, self._buffer)
        if self._closed:
            subscription._closed = True
        else:
            self._subscriptions.add(subscription)
        return subscription

    def close(self) -> None:
        """End every subscription: their iteration stops once they have read what is queued."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription._end()
        self._subscriptions.clear()

    def _discard(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)


class Subscription(ClosesOnExit):
    """An async iterator of :class:`Event` objects; also a context manager that unsubscribes.

    ::

        with supervisor.subscribe() as events:
            async for event in events:
                ...
    """

    def __init__(self, hub: EventHub, buffer: int) -> None:
        self._hub = hub
        self._queue: collections.deque[Event] = collections.deque(maxlen=buffer)
        self._wakeup = trio.Event()
        self._closed = False
        #: How many events this subscriber missed because it fell too far behind.
        self.skipped = 0

    def _push(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.skipped += 1  # the deque drops the oldest: skip ahead
        self._queue.append(event)
        self._wakeup.set()

    def _end(self) -> None:
        self._closed = True
        self._wakeup.set()

    def close(self) -> None:
        """Stop receiving events."""
        self._end()
        self._hub._discard(self)

    def drain_nowait(self) -> Iterator[Event]:
        """Yield the events already queued, without waiting."""
        while self._queue:
            yield self._queue.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        if self._queue:
            # Still a checkpoint, so a busy subscriber cannot starve the other tasks.
            await trio.lowlevel.checkpoint()
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self._queue.popleft()
