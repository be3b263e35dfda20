"""What a draining generation tells the one that replaced it, and what that one shows.

After an upgrade both generations run for the length of the old one's drain. The old
one reports over the parent-alive pipe (the pipe whose end tells the new one that the
old one exited): first who asked for the upgrade, then, every
:data:`REPORT_INTERVAL` seconds until it stopped, its state and its in-flight jobs.
The new generation keeps the latest report and shows it as the snapshot's
``previous_generation``, so an operator who follows the upgrade in the browser still
sees the work the old process is finishing.

Each message is one line of JSON written in one ``write()`` of at most ``PIPE_BUF``
bytes, so that the reader never sees half of one. The writer never blocks: a report
that does not fit in the pipe (the reader is slow) is skipped, the next one follows.
"""

from __future__ import annotations

import json
import math
import os
import select
import time
from typing import Any

#: Seconds between two reports of a draining generation.
REPORT_INTERVAL = 0.5
#: Jobs a report lists at most (the oldest first).
REPORT_JOBS = 20
#: Longest job key or text a report carries (characters).
TEXT_LIMIT = 100
#: Longest line the new generation reads; a longer one is dropped.
LINE_LIMIT = 65536

#: A report is written in one ``write()`` no longer than this, which POSIX makes atomic.
_ATOMIC_WRITE = select.PIPE_BUF
_STATES = ("running", "draining", "stopped")


# -- the old generation's side ------------------------------------------------------------


def upgrade_request(actor: str, new_pid: int) -> dict[str, Any]:
    """The first message: who asked for the upgrade, and when."""
    return {"asked_by": _text(actor), "asked_at": time.time(), "pid": os.getpid(), "to": new_pid}


def drain_report(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The state of this generation as sent to the next one, from its snapshot."""
    now = time.time()
    jobs = [
        {
            "service": _text(service["name"]),
            "key": _text(job["key"]) if isinstance(job["key"], str) else job["key"],
            "started": now - job["age"],
            "deadline": job["deadline"],
        }
        for service in snapshot["services"]
        for job in service["jobs"]
    ]
    jobs.sort(key=lambda job: job["started"])
    return {
        "pid": snapshot["pid"],
        "state": snapshot["state"],
        "exit_code": snapshot["exit_code"],
        "grace_deadline": snapshot["grace_deadline"],
        "in_flight": sum(service["in_flight"] for service in snapshot["services"]),
        "jobs": jobs[:REPORT_JOBS],
    }


def send_message(fd: int, message: dict[str, Any]) -> bool:
    """Write *message* as one line to the pipe *fd* without blocking.

    Returns False when the reader is gone (there is no one to report to any more).
    A message that does not fit in one atomic write loses jobs from the end of its
    list until it does; one the pipe has no room for now is skipped.
    """
    message = dict(message)
    line = _encode(message)
    while len(line) > _ATOMIC_WRITE and message.get("jobs"):
        message["jobs"] = message["jobs"][: len(message["jobs"]) // 2]
        line = _encode(message)
    if len(line) > _ATOMIC_WRITE:
        return True  # cannot happen with texts cut to TEXT_LIMIT; never write half a line
    try:
        os.set_blocking(fd, False)
        os.write(fd, line)
    except BlockingIOError:
        return True
    except OSError:  # EPIPE: the new generation exited, or closed its end
        return False
    return True


def _encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode()


# -- the new generation's side ------------------------------------------------------------


class PreviousGeneration:
    """What the new generation knows of the one it replaced, from its messages.

    The messages come from our own previous generation, but a report is checked
    field by field anyway: a bad one is dropped, never shown half-read.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.asked_by: str | None = None
        self.asked_at: float | None = None
        #: True once its end of the pipe closed: the process has exited.
        self.exited = False
        self._report: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int | None:
        """The exit code its drain ended with, once it reported one."""
        return None if self._report is None else self._report["exit_code"]

    def receive(self, line: bytes) -> str | None:
        """Take one message; return what the timeline should say of it, if anything."""
        try:
            message = json.loads(line)
        except ValueError:
            return None
        if not isinstance(message, dict):
            return None
        if "asked_by" in message:
            actor = _text(message.get("asked_by"))
            asked_at = _finite(message.get("asked_at"))
            if not actor or asked_at is None:
                return None
            self.asked_by, self.asked_at = actor, asked_at
            return f"upgrade asked by {actor} in the previous generation (pid {self.pid})"
        report = _checked_report(message)
        if report is not None:
            self._report = report
        return None

    def view(self) -> dict[str, Any]:
        """The snapshot's ``previous_generation``: plain JSON data, ages as of now."""
        now = time.time()
        report = self._report
        if self.exited:
            state = "exited"
        elif report is None:
            state = "running"  # it has not handed over yet: it still serves alone
        else:
            state = report["state"]
        jobs: list[dict[str, Any]] = []
        in_flight = 0
        grace_deadline = None
        if report is not None and not self.exited:
            in_flight = report["in_flight"]
            grace_deadline = report["grace_deadline"]
            jobs = [
                {
                    "service": job["service"],
                    "key": job["key"],
                    "age": max(0.0, now - job["started"]),
                    "time_left": None if job["deadline"] is None else job["deadline"] - now,
                }
                for job in report["jobs"]
            ]
        return {
            "pid": self.pid,
            "state": state,
            "asked_by": self.asked_by,
            "asked_at": self.asked_at,
            "exit_code": self.exit_code,
            "in_flight": in_flight,
            "grace_deadline": grace_deadline,
            "time_left": None if grace_deadline is None else grace_deadline - now,
            "jobs": jobs,
            "jobs_hidden": max(0, in_flight - len(jobs)),
        }


def _checked_report(message: dict[str, Any]) -> dict[str, Any] | None:
    state = message.get("state")
    in_flight = message.get("in_flight")
    exit_code = message.get("exit_code")
    raw_jobs = message.get("jobs")
    if (
        state not in _STATES
        or not _is_count(in_flight)
        or not (exit_code is None or (_is_count(exit_code) and exit_code < 256))
        or not isinstance(raw_jobs, list)
    ):
        return None
    grace_deadline = message.get("grace_deadline")
    if grace_deadline is not None and _finite(grace_deadline) is None:
        return None
    jobs = []
    for job in raw_jobs[:REPORT_JOBS]:
        if not isinstance(job, dict):
            return None
        started = _finite(job.get("started"))
        deadline = job.get("deadline")
        if started is None or (deadline is not None and _finite(deadline) is None):
            return None
        key = job.get("key")
        if not (key is None or isinstance(key, bool | int) or _finite(key) is not None):
            key = _text(key)
        jobs.append(
            {
                "service": _text(job.get("service")),
                "key": key,
                "started": started,
                "deadline": deadline,
            }
        )
    return {
        "state": state,
        "in_flight": in_flight,
        "exit_code": exit_code,
        "grace_deadline": grace_deadline,
        "jobs": jobs,
    }


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: object) -> str:
    """*value* as text no longer than :data:`TEXT_LIMIT` characters."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"
