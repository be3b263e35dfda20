"""The job sources each service uses: their backlog, rates and dead letters, watched.

A service's sources are the one its :func:`~nursery_down.worker_pool` takes jobs from,
and any given with ``sources=[...]`` at registration. While the supervisor runs, a
:class:`SourceWatch` reads each source's ``statistics()`` every
:data:`WATCH_INTERVAL` seconds and keeps the figures and the rates in and out, so
that a snapshot (which never waits) can show them.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from ._exceptions import ConfigurationError, InvalidTransitionError, UnknownSourceError
from .queues._source import DeadJob, JobSource, closed_by_owner

logger = logging.getLogger("nursery_down")

#: Seconds between two readings of a source's figures.
WATCH_INTERVAL = 2.0
#: Longest error text kept from a source.
ERROR_LIMIT = 200
#: What can be done with a source's dead letters, and the method of the source that does it.
DEAD_LETTER_METHODS = {
    "list": "dead_letters",
    "requeue": "requeue_dead_letters",
    "discard": "purge_dead_letters",
}


def source_name(source: object) -> str:
    """How the dashboard names a source: its ``name``, the file of a SQLite queue, or
    its class."""
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    path = getattr(source, "path", None)
    if isinstance(path, str) and path:
        return os.path.basename(path)
    return type(source).__name__


def require_sources(service: str, sources: Iterable[object]) -> tuple[JobSource, ...]:
    """Check that every one of *sources* is a job source; return them as a tuple."""
    if isinstance(sources, str | bytes):
        raise ConfigurationError(f"service {service!r}: sources must be a list of job sources")
    found: list[JobSource] = []
    for source in sources:
        if not isinstance(source, JobSource):
            raise ConfigurationError(
                f"service {service!r}: {type(source).__name__} is not a job source "
                "(claim, ack, release, fail)"
            )
        if source not in found:
            found.append(source)
    return tuple(found)


@dataclass
class _Reading:
    at: float
    total: int
    done: int


class SourceFigures:
    """The latest figures of one source of one service, and its rates."""

    def __init__(self, source: JobSource) -> None:
        self.source = source
        self.name = source_name(source)
        self.figures: dict[str, int] | None = None
        self.rate_in: float | None = None
        self.rate_out: float | None = None
        self.error: str | None = None
        self._last: _Reading | None = None

    async def read(self) -> None:
        """Read the source's figures now; a failure is kept as text, never raised."""
        statistics = getattr(self.source, "statistics", None)
        if not callable(statistics) or closed_by_owner(self.source):
            return  # nothing to read, or closed by its service: never open it again here
        try:
            figures = statistics()
            if inspect.isawaitable(figures):
                figures = await figures
        except Exception as exc:  # a source of the user's too: say what it did, keep watching
            self.error = _one_line(f"{type(exc).__name__}: {exc}")
            return
        counts = {
            key: int(getattr(figures, key, 0) or 0) for key in ("queued", "leased", "done", "dead")
        }
        now = trio.current_time()
        reading = _Reading(now, sum(counts.values()), counts["done"])
        last = self._last
        if last is not None and now > last.at:
            seconds = now - last.at
            self.rate_out = max(0, reading.done - last.done) / seconds
            # Every job is queued, leased, done or dead: what came in is what the total grew.
            self.rate_in = max(0, reading.total - last.total) / seconds
        self._last = reading
        self.figures = counts
        self.error = None

    def view(self, index: int) -> dict[str, Any]:
        """Plain JSON data for the snapshot."""
        return {
            "index": index,
            "name": self.name,
            "kind": type(self.source).__name__,
            **(self.figures or {"queued": None, "leased": None, "done": None, "dead": None}),
            "rate_in": self.rate_in,
            "rate_out": self.rate_out,
            "error": self.error,
            # What can be done with its dead letters here: "list", "requeue", "discard".
            "dead_letters": [
                action
                for action, method in DEAD_LETTER_METHODS.items()
                if callable(getattr(self.source, method, None))
            ],
        }


class SourceWatch:
    """Every service's sources, read every :data:`WATCH_INTERVAL` seconds while running."""

    def __init__(self, active: Callable[[str], bool]) -> None:
        self.by_service: dict[str, list[SourceFigures]] = {}
        # Sources are read only while their service runs (it may close them when it stops).
        self._active = active

    def add(self, service: str, sources: Iterable[JobSource]) -> None:
        listed = self.by_service.setdefault(service, [])
        for source in sources:
            if all(entry.source is not source for entry in listed):
                listed.append(SourceFigures(source))

    def of(self, service: str) -> list[SourceFigures]:
        return self.by_service.get(service, [])

    def entry(self, service: str, index: int) -> SourceFigures:
        """Source number *index* of *service*; :class:`UnknownSourceError` if none."""
        entries = self.of(service)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(entries):
            raise UnknownSourceError(service, index, len(entries))
        return entries[index]

    async def dead_letters(self, service: str, index: int) -> list[DeadJob]:
        """The dead letters of a service's source, oldest first."""
        source = self.entry(service, index).source
        result = _method(source, "list", service, index)()
        if inspect.isawaitable(result):
            result = await result
        return list(result)

    async def settle_dead(
        self, service: str, index: int, action: str, ids: list[int] | None
    ) -> int:
        """Requeue or discard (*action*) dead letters *ids* (all when None); how many."""
        entry = self.entry(service, index)
        count = _method(entry.source, action, service, index)(ids)
        if inspect.isawaitable(count):
            count = await count
        await entry.read()  # the figures show it at once
        return int(count)

    def view(self, service: str) -> list[dict[str, Any]]:
        return [entry.view(index) for index, entry in enumerate(self.of(service))]

    async def run(self) -> None:
        """Read every source now and then every interval, until cancelled."""
        while True:
            started = trio.current_time()
            for service, entries in list(self.by_service.items()):
                if not self._active(service):
                    continue
                for entry in entries:
                    await entry.read()
            await trio.sleep_until(started + WATCH_INTERVAL)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"


def _method(source: object, action: str, service: str, index: int) -> Callable[..., Any]:
    method = getattr(source, DEAD_LETTER_METHODS[action], None)
    if not callable(method):
        raise InvalidTransitionError(
            f"source {source_name(source)} of service {service!r} (#{index}) cannot "
            f"{action} its dead letters here"
        )
    return method  # type: ignore[no-any-return]
