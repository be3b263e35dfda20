"""Drain reports: the story of each drain, told when it ended.

One :class:`DrainReports` per supervisor owns them. A drain of one service (asked
for on its own, as part of a restart, or as part of a whole-app drain) gets a
:class:`ServiceDrainReport` when it begins: who asked, the grace, and the jobs in
flight at that instant. Each of those jobs says how it ended through the drain
(``Drain.report``, set only while a drain is under way, so a job ending outside a
drain pays one attribute check). When the service's run is over, the report is
reduced to plain data: counts for every job, details for at most
:data:`DETAILS_KEPT` of them (those cut first, then the slowest), the job that
held the drain longest, and one summary log line. A whole-app drain groups the
reports of its services and adds the exit code it led to.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import trio

logger = logging.getLogger("nursery_down")

#: Reports kept (the oldest goes first).
REPORTS_KEPT = 10
#: Jobs described one by one in a report; the others are only counted.
DETAILS_KEPT = 50
#: Characters of a job key or actor kept in a log line or a report.
TEXT_LIMIT = 200

#: What became of a job, as a report says it.
FINISHED, FAILED, CUT, RELEASED, RUNNING = (
    "finished",
    "failed",
    "hard_cancelled",
    "released",
    "running",
)


class Job(Protocol):
    """What a report reads of a job (``nursery_down.Job``, or a worker pool's)."""

    key: Hashable
    started: float

    @property
    def outcome(self) -> str: ...


class Drain(Protocol):
    """What a report reads of a run's drain (``nursery_down._drain.Drain``)."""

    now: Callable[[], float]
    deadline: float

    @property
    def cut(self) -> bool: ...

    report: ServiceDrainReport | None


def log_safe(value: object, limit: int = TEXT_LIMIT) -> str:
    """*value* as text for one log line that cannot pass for anything else.

    Characters that are not printable (line feeds, escape sequences, the Unicode line
    separators) are written as their Python escapes, and a backslash as two, so an
    escape in the log is always one made here; text beyond *limit* is cut and counted.
    """
    text = str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    if not text.isprintable() or "\\" in text:
        text = "".join(
            "\\\\" if char == "\\" else char if char.isprintable() else repr(char)[1:-1]
            for char in text
        )
    return f"{text}... ({cut} more characters)" if cut > 0 else text


def _plain_key(key: Hashable) -> object:
    if key is None or isinstance(key, bool):
        return key
    if isinstance(key, int) and abs(key) < 2**53:
        return key
    if isinstance(key, float) and math.isfinite(key):
        return key
    text = str(key)
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + "..."


class ServiceDrainReport:
    """The drain of one service, while it runs: the jobs in flight when it began."""

    def __init__(
        self,
        service: str,
        drain: Drain,
        *,
        action: str,
        actor: str,
        deadline: float,
        in_flight: list[Job],
    ) -> None:
        self.service = service
        self.action = action
        self.actor = actor
        self.began = drain.now()
        self.began_wall = time.time()
        self.grace = max(0.0, deadline - self.began)
        self._drain = drain
        # Each job in flight when the drain began: key, start, and (once it ended)
        # the time it ended and what became of it (None: read job.outcome then).
        self._jobs: dict[Job, list[Any]] = {
            job: [job.key, job.started, None, None] for job in in_flight
        }

    def job_ended(self, job: Job, outcome: str | None = None) -> None:
        """A job ended while the drain ran (*outcome*, or read from ``job.outcome``)."""
        entry = self._jobs.get(job)
        if entry is not None and entry[2] is None:
            entry[2] = self._drain.now()
            entry[3] = outcome

    def finish(self) -> dict[str, Any]:
        """The report as plain JSON data (the drain is over: no job is still running)."""
        drain = self._drain
        ended = drain.now()
        counts = {FINISHED: 0, FAILED: 0, CUT: 0, RELEASED: 0, RUNNING: 0}
        described = []
        for job, (key, started, end, outcome) in self._jobs.items():
            if end is None:
                what, seconds = RUNNING, ended - self.began
            else:
                what = outcome or _outcome_of(job.outcome)
                seconds = end - self.began
            counts[what] += 1
            described.append((what, seconds, key, started))
        self._jobs.clear()
        # Cut jobs first, then the slowest: the ones an operator asks about.
        described.sort(key=lambda item: (item[0] not in (CUT, RELEASED, RUNNING), -item[1]))
        details = [
            {
                "key": _plain_key(key),
                "outcome": what,
                "after": round(seconds, 6),
                "age_at_drain": round(self.began - started, 6) if math.isfinite(started) else None,
            }
            for what, seconds, key, started in described[:DETAILS_KEPT]
        ]
        longest = max(described, key=lambda item: item[1], default=None)
        duration = ended - self.began
        final_grace = drain.deadline - self.began
        return {
            "service": self.service,
            "action": self.action,
            "actor": log_safe(self.actor),
            "began": self.began_wall,
            "grace": self.grace,
            # The grace in the end, after extend_grace or escalate moved the deadline.
            "final_grace": final_grace if math.isfinite(final_grace) else None,
            "duration": round(duration, 6),
            # Nothing cut: no job, and no work of the service outside one.
            "within_grace": counts[CUT] + counts[RELEASED] == 0 and not drain.cut,
            "jobs": len(described),
            "finished": counts[FINISHED],
            "failed": counts[FAILED],
            "hard_cancelled": counts[CUT],
            "released": counts[RELEASED],
            "running": counts[RUNNING],
            "longest": (
                None
                if longest is None
                else {"key": _plain_key(longest[2]), "outcome": longest[0], "after": longest[1]}
            ),
            "details": details,
            "details_hidden": max(0, len(described) - len(details)),
        }


def _outcome_of(outcome: str) -> str:
    if outcome == "completed":
        return FINISHED
    return outcome if outcome in (FAILED, CUT) else RUNNING


def summary(report: dict[str, Any]) -> str:
    """One line: ``drain of workers: 20 jobs, 19 finished within 3.4 s, 1 cut at the
    30 s grace (msg-17), released``."""
    if "services" in report:
        jobs = sum(s["jobs"] for s in report["services"])
        cut = sum(s["hard_cancelled"] + s["released"] for s in report["services"])
        finished = sum(s["finished"] for s in report["services"])
        parts = [
            f"drain of the whole app by {log_safe(report['actor'])}: "
            f"{_count(len(report['services']), 'service')}, {_jobs(jobs)}, {finished} finished, "
            f"{cut} cut, in {report['duration']:.1f} s of the {round(report['grace'], 1):g} s grace"
        ]
        overran = [log_safe(s["service"]) for s in report["services"] if _cut_outside_jobs(s)]
        if overran:  # no job cut, yet the grace was: say what it cut
            parts.append(f"{', '.join(overran)} still running at the grace deadline")
        if report["exit_code"] is not None:
            parts.append(f"exit code {report['exit_code']}")
        return ", ".join(parts)
    parts = [f"drain of {log_safe(report['service'])} by {log_safe(report['actor'])}"]
    counts = [_jobs(report["jobs"])]
    if report["finished"]:
        slowest = max(
            (d["after"] for d in report["details"] if d["outcome"] == FINISHED), default=0.0
        )
        counts.append(f"{report['finished']} finished within {slowest:.1f} s")
    if report["failed"]:
        counts.append(f"{report['failed']} failed")
    for outcome, words in ((CUT, "hard-cancelled"), (RELEASED, "released")):
        if report[outcome]:
            keys = [log_safe(d["key"], 40) for d in report["details"] if d["outcome"] == outcome]
            shown = ", ".join(keys[:3]) + (", ..." if report[outcome] > 3 else "")
            counts.append(
                f"{report[outcome]} cut at the {round(report['final_grace'] or 0, 1):g} s grace "
                f"({shown}), "
                f"{words}"
            )
    if _cut_outside_jobs(report):
        counts.append("still running at the grace deadline, and cut there")
    line = f"{parts[0]}: {', '.join(counts)}"
    if not report["finished"] and not report["hard_cancelled"] and not report["released"]:
        line += f", over in {report['duration']:.1f} s"
    return line


def _cut_outside_jobs(report: dict[str, Any]) -> bool:
    """A service's drain cut nothing but the service itself, still running outside any
    job at the grace deadline."""
    return not report["within_grace"] and not report["hard_cancelled"] + report["released"]


def format_drain_report(report: dict[str, Any]) -> str:
    """A whole-app drain report in a few lines (``nursery-down run`` prints it at exit)."""
    lines = [f"nursery-down: {summary(report)}"]
    for service in report.get("services", []):
        lines.append(f"  {summary(service)}")
        longest = service["longest"]
        if longest is not None and longest["outcome"] != FINISHED:
            lines.append(
                f"    held longest by {log_safe(longest['key'], 80)}: "
                f"{longest['outcome'].replace('_', '-')} after {longest['after']:.1f} s"
            )
    return "\n".join(lines) + "\n"


def _jobs(count: int) -> str:
    return _count(count, "job")


def _count(count: int, noun: str) -> str:
    return f"1 {noun}" if count == 1 else f"{count} {noun}s"


class DrainReports:
    """The last :data:`REPORTS_KEPT` drain reports, and the drains under way."""

    def __init__(self) -> None:
        self._done: collections.deque[dict[str, Any]] = collections.deque(maxlen=REPORTS_KEPT)
        # Who asked last, per service name (None: the whole app): (action, actor).
        self._asked: dict[str | None, tuple[str, str]] = {}
        # The whole-app drain under way: its report so far, and the services it waits on.
        self._app: dict[str, Any] | None = None
        self._app_open: set[str] = set()
        self._app_began = math.nan
        #: Reports told so far (each report's ``number``).
        self.count = 0

    def asked(self, service: str | None, action: str, actor: str) -> None:
        """Someone asked for *action* on *service* (None: the whole app)."""
        self._asked[service] = (action, actor)

    def forget(self, service: str | None) -> None:
        """What was asked of *service* (None: the whole app) is over."""
        self._asked.pop(service, None)

    def app_began(self, grace: float) -> None:
        """A whole-app drain began with *grace* (counted from the end of any pre-drain)."""
        action, actor = self._asked.pop(None, ("drain", "the supervisor"))
        self._app_began = trio.current_time()
        self._app = {
            "scope": "app",
            "action": action,
            "actor": log_safe(actor),
            "began": time.time(),
            "grace": grace,
            "duration": 0.0,
            "exit_code": None,
            "services": [],
        }

    def service_began(self, service: str, drain: Drain, deadline: float, jobs: list[Job]) -> None:
        """A drain of *service* began: its run's *drain* reports each job's end here."""
        if self._app is not None:
            action, actor = self._app["action"], self._app["actor"]
            self._app_open.add(service)
        else:
            asked = self._asked.pop(service, None) or self._asked.get(None)
            action, actor = asked or ("drain", "the supervisor")
        drain.report = ServiceDrainReport(
            service, drain, action=action, actor=actor, deadline=deadline, in_flight=jobs
        )

    def service_ended(self, drain: Drain) -> None:
        """The run whose drain this was is over: reduce its report and log it."""
        running = drain.report
        if running is None:
            return
        drain.report = None
        report = running.finish()
        report["summary"] = summary(report)
        logger.info("%s", report["summary"])
        app = self._app
        if app is not None and running.service in self._app_open:
            self._app_open.discard(running.service)
            app["services"].append(report)
        else:
            self._keep({"scope": "service", **report})

    def app_finished(self, exit_code: int | None) -> None:
        """The whole-app drain is over (or the supervisor stopped) with *exit_code*."""
        app = self._app
        if app is None:
            last = self._done[-1] if self._done else None
            if (
                exit_code is not None
                and last is not None
                and last["scope"] == "app"
                and last["exit_code"] != exit_code
            ):
                last["exit_code"] = exit_code
                last["summary"] = summary(last)
            return
        self._app = None
        self._app_open.clear()
        app["exit_code"] = exit_code
        app["duration"] = round(trio.current_time() - self._app_began, 6)
        app["summary"] = summary(app)
        self._keep(app)
        logger.info("%s", app["summary"])

    def _keep(self, report: dict[str, Any]) -> None:
        self.count += 1
        report["number"] = self.count
        self._done.append(report)

    def reports(self) -> list[dict[str, Any]]:
        """The last reports, oldest first, as plain JSON data."""
        return [dict(report) for report in self._done]

    def last(self) -> dict[str, Any] | None:
        """The latest report, or None before the first drain ended."""
        return dict(self._done[-1]) if self._done else None

    def last_app_report(self) -> dict[str, Any] | None:
        for report in reversed(self._done):
            if report["scope"] == "app":
                return dict(report)
        return None
