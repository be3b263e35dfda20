"""What the page shows, computed from a snapshot: durations, impact lines, which actions apply.

static/app.js computes the same texts in the browser; keep the two in step.
"""

from __future__ import annotations

import math
import time
from typing import Any

#: Jobs listed per service; the rest are counted as hidden.
JOBS_SHOWN = 50

#: Events shown in the timeline.
TIMELINE_LENGTH = 100


def duration(seconds: float | None) -> str:
    """``"42 s"``, ``"3 m 12 s"``, ``"2 h 5 m"``; a dash for None."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} m {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} m"


def clock(timestamp: float) -> str:
    """Wall-clock time of day, local time, ``"14:03:27"``."""
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def in_flight_summary(in_flight: int, jobs: list[dict[str, Any]], grace: float) -> str:
    """``"7 jobs in flight, oldest 42 s; 2 will exceed the 30 s grace"``.

    A job already running longer than the grace is counted as one that will exceed
    it: the jobs listed are the oldest, so the count is exact unless all are listed
    as exceeding (then it is a lower bound, shown with a ``+``).
    """
    if in_flight == 0:
        return "no jobs in flight"
    oldest = max((job["age"] for job in jobs), default=None)
    text = f"{plural(in_flight, 'job')} in flight, oldest {duration(oldest)}"
    over = sum(1 for job in jobs if job["age"] >= grace)
    if over:
        more = "+" if over == len(jobs) and in_flight > len(jobs) else ""
        text += f"; {over}{more} will exceed the {grace:g} s grace"
    else:
        text += f"; grace {grace:g} s"
    return text


def service_impacts(service: dict[str, Any]) -> dict[str, str]:
    """The line shown before confirming each action on one service."""
    summary = in_flight_summary(service["in_flight"], service["jobs"], service["grace"])
    in_flight = service["in_flight"]
    left = time_left(service.get("grace_deadline"))
    return {
        "drain": f"Stops intake now; {summary}.",
        "start": f"Starts {service['name']} again.",
        "restart": f"Drains, then starts again; {summary}.",
        "escalate": (
            f"Hard-cancels {plural(in_flight, 'job')} in flight now; they go back to their source."
            if in_flight
            else "No jobs in flight: stops at once."
        ),
        "extend-grace": (
            f"Moves the hard-cancel deadline later; {plural(in_flight, 'job')} in flight, "
            f"{duration(left)} left."
        ),
    }


def app_impacts(snapshot: dict[str, Any]) -> dict[str, str]:
    """The line shown before confirming each whole-app action."""
    services = snapshot["services"]
    in_flight = sum(s["in_flight"] for s in services)
    jobs = [job for s in services for job in s["jobs"]]
    summary = in_flight_summary(in_flight, jobs, snapshot["grace"])
    left = time_left(snapshot.get("grace_deadline"))
    return {
        "drain": f"Drains every service in stop order, then the process exits; {summary}.",
        "restart": (
            "Stops every running service in stop order, then starts them again in start "
            f"order; {summary}."
        ),
        "escalate": (
            f"Hard-cancels {plural(in_flight, 'job')} in flight now; the process exits."
            if in_flight
            else "No jobs in flight: the process exits at once."
        ),
        "extend-grace": (f"Moves every drain's hard-cancel deadline later; {duration(left)} left."),
        "upgrade": (
            "Runs the program again (new code) with these sockets; once it is ready, this "
            f"process drains and exits; {summary}."
        ),
    }


def previous_summary(previous: dict[str, Any] | None) -> str:
    """The line about the generation an upgrade replaced:
    ``"pid 41 · draining · asked by signal SIGUSR2 · 3 jobs in flight · hard-cancel in 12 s"``."""
    if previous is None:
        return ""
    state = previous["state"]
    parts = [f"pid {previous['pid']}", state]
    if previous["asked_by"]:
        parts.append(f"asked by {previous['asked_by']}")
    if state in ("running", "draining"):
        parts.append(f"{plural(previous['in_flight'], 'job')} in flight")
        if previous["time_left"] is not None:
            parts.append(f"hard-cancel in {duration(previous['time_left'])}")
    if previous["exit_code"] is not None:
        parts.append(f"exit code {previous['exit_code']}")
    return " · ".join(parts)


def source_summary(source: dict[str, Any]) -> str:
    """``"queued 12 · leased 3 · done 480 · dead 1 · in 2.0/s · out 1.8/s"``."""
    if source["error"]:
        return f"cannot read it: {source['error']}"
    if source["queued"] is None:
        return "not read yet"
    parts = [f"{key} {source[key]}" for key in ("queued", "leased", "done", "dead")]
    for key, label in (("rate_in", "in"), ("rate_out", "out")):
        if source[key] is not None:
            parts.append(f"{label} {source[key]:.1f}/s")
    return " · ".join(parts)


def time_left(deadline: float | None) -> float | None:
    """Seconds until a wall-clock *deadline*, or None."""
    return None if deadline is None else deadline - time.time()


def event_text(event: dict[str, Any]) -> str:
    """A timeline line: ``workers: stopped (drained)``, ``app: draining ...``."""
    message = event["message"]
    if event["kind"] == "state" and event["service"]:
        state = event["state"]
        detail = "" if message == state else f" ({message})"
        return f"{event['service']}: {state}{detail}"
    if event["kind"] == "app":
        return f"app: {message}"
    if event["kind"] == "health" and event["service"]:
        return f"{event['service']}: {message}"
    return str(message)


def job_info(info: dict[str, Any]) -> str:
    """A job's keyword arguments as ``topic=orders attempt=2``."""
    return " ".join(f"{key}={value}" for key, value in info.items())


def page_context(snapshot: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the page template needs, from a snapshot and the recent events."""
    return {
        "snapshot": snapshot,
        "app_impacts": app_impacts(snapshot),
        "impacts": {s["name"]: service_impacts(s) for s in snapshot["services"]},
        "timeline": list(reversed(events[-TIMELINE_LENGTH:])),
        "now": time.time(),
        "duration": duration,
        "clock": clock,
        "job_info": job_info,
        "event_text": event_text,
        "previous_summary": previous_summary,
        "source_summary": source_summary,
    }
