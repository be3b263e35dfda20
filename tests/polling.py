"""Waiting on a subprocess from a plain test: poll until something holds, or fail.

A test never sleeps to let a program get somewhere: it polls what the program shows
(its log, its dashboard, the files it writes, /proc) until the state it needs is
there, bounded by a timeout that only a hang can reach.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PATIENCE = 20.0


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = PATIENCE,
    what: str = "it",
    *,
    process: subprocess.Popen[Any] | None = None,
) -> T:
    """Poll *predicate* every 20 ms until it returns something truthy; fail after *timeout*.

    With *process*, fail at once if it exits before *predicate* holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited {process.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling a subprocess: nothing to wait on but time


def wait_for_line(
    log: Path,
    pattern: str,
    timeout: float = PATIENCE,
    *,
    process: subprocess.Popen[Any] | None = None,
) -> re.Match[str]:
    """Wait until *pattern* matches in the file *log*; the match. The failure shows the log."""
    try:
        return wait_for(
            lambda: re.search(pattern, log.read_text()), timeout, repr(pattern), process=process
        )
    except AssertionError as error:
        raise AssertionError(f"{error} in {log}:\n{log.read_text()}") from None
