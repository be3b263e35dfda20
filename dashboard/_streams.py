"""Server-sent events: each open ``/api/events`` stream, and ending them all at shutdown."""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from nursery_down import Event, Subscription, Supervisor

from ._responses import encode_json
from ._view import JOBS_SHOWN, TIMELINE_LENGTH

#: Seconds between checks for changed counts (sent as a ``snapshot`` if anything changed).
#: Each stream starts at a random phase: streams opened together would otherwise all
#: send their snapshots in one burst each second, and an event would wait behind it.
SNAPSHOT_INTERVAL = 1.0
#: Seconds between ``: ping`` comments on an otherwise quiet stream.
PING_INTERVAL = 10.0
#: What the browser waits before reconnecting a stream that ended (milliseconds).
RETRY_MS = 1000
#: Streams asking for a snapshot within this many seconds share one (built and encoded
#: once): with many streams open, per-stream snapshots would delay the next event.
SNAPSHOT_SHARING = 0.05
#: Encoded events kept for the streams that have yet to send them.
EVENT_CACHE = 256


def frame(event: str, data: object) -> bytes:
    """One SSE message; each line of the JSON payload is its own ``data:`` line."""
    payload = encode_json(data)
    lines = "".join(f"data: {line}\n" for line in payload.split("\n"))
    return f"event: {event}\n{lines}\n".encode()


def live_snapshot(supervisor: Supervisor, *, events: bool = False) -> dict[str, Any]:
    """The snapshot as sent to the page: capped job lists and the server's clock."""
    snapshot = supervisor.snapshot(max_jobs=JOBS_SHOWN)
    snapshot["server_time"] = time.time()
    # The story of the last drain, shown until the next one ends.
    snapshot["drain_report"] = supervisor.last_drain_report()
    if events:
        snapshot["events"] = [e.to_dict() for e in supervisor.events()[-TIMELINE_LENGTH:]]
    return snapshot


def _signature(snapshot: dict[str, Any]) -> object:
    """What changes the page beyond the ages it ticks by itself."""
    previous = snapshot.get("previous_generation")
    return (
        None
        if previous is None
        else (
            previous["state"],
            previous["in_flight"],
            previous["exit_code"],
            previous["grace_deadline"],
            tuple((job["service"], job["key"]) for job in previous["jobs"]),
        ),
        snapshot["state"],
        snapshot["grace_deadline"],
        (snapshot.get("drain_report") or {}).get("number"),
        tuple(
            (
                s["state"],
                s["in_flight"],
                s["completed"],
                s["failed"],
                s["hard_cancelled"],
                s["restarts"],
                s["health"],
                s["grace_deadline"],
                s["health_reason"],
                tuple((q["queued"], q["leased"], q["done"], q["dead"]) for q in s["sources"]),
                tuple(job["key"] for job in s["jobs"]),
            )
            for s in snapshot["services"]
        ),
    )


class EventStreams:
    """Every open event stream of one dashboard.

    Each stream sends a ``snapshot`` first (with the recent events), then each
    supervisor event as an ``event`` message as it happens, a fresh ``snapshot``
    whenever counts change, and ``: ping`` comments while nothing does. :meth:`close`
    ends them all at once, so that the server can shut down without waiting for them.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._snapshot: tuple[float, object, bytes] = (-math.inf, None, b"")
        self._events: dict[int, bytes] = {}
        self._open: set[Subscription] = set()
        self._closed = False
        self._all_ended = trio.Event()
        self._all_ended.set()

    @property
    def open_count(self) -> int:
        """How many streams are open now."""
        return len(self._open)

    def close(self) -> None:
        """End every stream now and refuse new ones (they get one snapshot and end)."""
        self._closed = True
        for subscription in list(self._open):
            subscription.close()

    async def wait_all_ended(self) -> None:
        """Wait until no stream is open."""
        await self._all_ended.wait()

    def _event_frame(self, event: Event) -> bytes:
        """*event* as an SSE message, encoded once for every stream."""
        encoded = self._events.get(event.seq)
        if encoded is None:
            encoded = self._events[event.seq] = frame("event", event.to_dict())
            if len(self._events) > EVENT_CACHE:
                del self._events[next(iter(self._events))]
        return encoded

    def _snapshot_frame(self) -> tuple[object, bytes]:
        """A recent snapshot's signature and SSE message, shared by the streams."""
        now = trio.current_time()
        built, signature, encoded = self._snapshot
        if now - built >= SNAPSHOT_SHARING:
            snapshot = live_snapshot(self._supervisor)
            signature, encoded = _signature(snapshot), frame("snapshot", snapshot)
            self._snapshot = (now, signature, encoded)
        return signature, encoded

    def stream(self) -> AsyncIterator[bytes]:
        """The body of one ``/api/events`` response."""
        return self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        # Subscribing here rather than in stream() means a body that is never
        # iterated holds nothing. The client going away cancels this generator at a
        # yield and the finally unsubscribes; no yield happens inside a cancel scope.
        subscription = self._supervisor.subscribe()
        if self._closed:
            subscription.close()
        else:
            self._open.add(subscription)
            self._all_ended = trio.Event()
        try:
            first = live_snapshot(self._supervisor, events=True)
            last = _signature(first)
            yield f"retry: {RETRY_MS}\n".encode() + frame("snapshot", first)
            now = trio.current_time()
            next_snapshot = now + random.uniform(0.0, SNAPSHOT_INTERVAL)
            next_ping = now + PING_INTERVAL
            skipped = subscription.skipped
            while True:
                chunk: list[bytes] = []
                ended = False
                with trio.move_on_at(min(next_snapshot, next_ping)):
                    try:
                        event = await subscription.__anext__()
                    except StopAsyncIteration:
                        ended = True
                    else:
                        chunk.append(self._event_frame(event))
                        chunk.extend(map(self._event_frame, subscription.drain_nowait()))
                if ended:
                    break
                now = trio.current_time()
                if now >= next_snapshot:
                    # The next tick of this stream's own phase, even after a slow spell.
                    next_snapshot += SNAPSHOT_INTERVAL * (
                        (now - next_snapshot) // SNAPSHOT_INTERVAL + 1
                    )
                    if subscription.skipped != skipped:
                        # It fell behind and missed events: resend the timeline too.
                        skipped = subscription.skipped
                        snapshot = live_snapshot(self._supervisor, events=True)
                        last = _signature(snapshot)
                        chunk.append(frame("snapshot", snapshot))
                    else:
                        signature, encoded = self._snapshot_frame()
                        if signature != last:
                            last = signature
                            chunk.append(encoded)
                if not chunk and now >= next_ping:
                    chunk.append(b": ping\n\n")
                if chunk:
                    next_ping = now + PING_INTERVAL
                    yield b"".join(chunk)
        finally:
            subscription.close()
            self._open.discard(subscription)
            if not self._open:
                self._all_ended.set()
