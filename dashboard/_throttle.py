"""Slowing down token guessing: too many wrong tokens from one address, and it waits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ._audit import audit

#: Wrong tokens from one address within :data:`FAILURE_WINDOW` seconds before it is refused.
FAILURE_LIMIT = 10
#: Seconds over which wrong tokens are counted; a refused address waits out the rest.
FAILURE_WINDOW = 60.0
#: Addresses remembered at most (each a few dozen bytes), however many guess.
MAX_ADDRESSES = 4096


@dataclass(slots=True)
class _Window:
    start: float
    failures: int


class FailedAttempts:
    """Wrong tokens per client address, counted in windows of :data:`FAILURE_WINDOW` s.

    After :data:`FAILURE_LIMIT` wrong tokens in one window, the address is refused
    (``429``) until the window ends, right tokens included: a guess that happens to
    be right must not get through either. Memory stays bounded: at most
    :data:`MAX_ADDRESSES` addresses are kept, ended windows first to go.
    """

    def __init__(
        self,
        *,
        limit: int = FAILURE_LIMIT,
        window: float = FAILURE_WINDOW,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._max_addresses = max_addresses
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def retry_after(self, address: str) -> float | None:
        """Seconds until *address* may try again, or None if it may now."""
        entry = self._windows.get(address)
        if entry is None or entry.failures < self._limit:
            return None
        left = entry.start + self._window - self._clock()
        if left <= 0:
            del self._windows[address]
            return None
        return left

    def failed(self, address: str) -> bool:
        """Count one wrong token from *address*; True if that made it wait (audit it)."""
        now = self._clock()
        entry = self._windows.get(address)
        if entry is None or now - entry.start >= self._window:
            if entry is None and len(self._windows) >= self._max_addresses:
                self._make_room(now)
            self._windows[address] = entry = _Window(start=now, failures=0)
        entry.failures += 1
        return entry.failures == self._limit

    def _make_room(self, now: float) -> None:
        for address in [a for a, w in self._windows.items() if now - w.start >= self._window]:
            del self._windows[address]
        while len(self._windows) >= self._max_addresses:
            del self._windows[next(iter(self._windows))]  # the longest-known address


def count_wrong_token(attempts: FailedAttempts, address: str) -> None:
    """Count a wrong token from *address*; audit the moment it is made to wait."""
    if attempts.failed(address):
        audit(
            "guess the operator token",
            f"unknown {address}",
            f"refused 429: {FAILURE_LIMIT} wrong tokens within {FAILURE_WINDOW:g} s; "
            "this address waits until the window ends",
        )
