"""Waiting on a subprocess from a plain test: poll until something holds, or fail."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PATIENCE = 20.0


def wait_for(predicate: Callable[[], T | None], timeout: float = PATIENCE, what: str = "it") -> T:
    """Poll *predicate* every 20 ms until it returns something truthy; fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling a subprocess: nothing to wait on but time


def wait_for_line(log: Path, pattern: str, timeout: float = PATIENCE) -> re.Match[str]:
    """Wait until *pattern* matches in the file *log*; the match. The failure shows the log."""
    try:
        return wait_for(lambda: re.search(pattern, log.read_text()), timeout, repr(pattern))
    except AssertionError as error:
        raise AssertionError(f"{error} in {log}:\n{log.read_text()}") from None
