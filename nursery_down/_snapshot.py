"""The snapshot: the supervisor's whole state as plain JSON data (``GET /api/snapshot``)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import Any

import trio

from ._health import Health, HealthBoard
from ._records import ServiceRecord
from ._sources import SourceWatch
from ._state import ServiceState


def build_snapshot(
    records: Iterable[ServiceRecord],
    *,
    app: str,
    state: str,
    draining: bool,
    grace: float,
    app_deadline: float,
    exit_code: int | None,
    pre_drain: float,
    pre_drain_until: float | None,
    warnings: list[str],
    max_jobs: int | None,
    previous_generation: dict[str, Any] | None = None,
    upgrade_timeout: float | None = None,
    health: HealthBoard | None = None,
    sources: SourceWatch | None = None,
) -> dict[str, Any]:
    """The whole app as plain JSON-able data: the schema documented in the README."""
    try:
        now = trio.current_time()
    except RuntimeError:  # called outside trio: no ages, no deadlines
        now = math.nan
    to_wall = time.time() - now

    def wall(deadline: float) -> float | None:
        return None if not math.isfinite(deadline) or math.isnan(now) else deadline + to_wall

    services = []
    for record in records:
        counters = record.counters
        in_flight = counters.in_flight
        jobs = []
        for index, job in enumerate(in_flight):
            if max_jobs is not None and index >= max_jobs:
                break
            deadline = job.deadline
            jobs.append(
                {
                    "key": _jsonable(job.key),
                    "age": now - job.started,
                    "deadline": wall(deadline),
                    "time_left": (deadline - now) if math.isfinite(deadline) else None,
                    "info": {str(k): _jsonable(v) for k, v in job.info.items()},
                }
            )
        drain = record.drain
        deadline = drain.deadline if drain is not None else math.inf
        if record.state is not ServiceState.DRAINING:
            deadline = math.inf
        service_health = health.get(record.name) if health is not None else Health()
        service_grace = record.spec.grace if record.spec.grace is not None else grace
        services.append(
            {
                "name": record.name,
                "state": record.state.value,
                "in_flight": len(in_flight),
                "completed": counters.completed,
                "failed": counters.failed,
                "hard_cancelled": counters.hard_cancelled,
                "cut": record.cut,
                "restarts": record.restarts,
                "health": service_health.value,
                # Why it is not ok (a check's error, what the service said), else None.
                "health_reason": service_health.reason,
                # False: left out of the app's readiness (readiness=False).
                "readiness": record.spec.readiness,
                # Its job sources: backlog, rates in and out, dead letters.
                "sources": [] if sources is None else sources.view(record.name),
                "since": record.since,
                "oldest_job_age": counters.oldest_age(now),
                "grace": service_grace,
                "grace_deadline": wall(deadline),
                "restart": record.spec.restart,
                "after": list(record.spec.after),
                "last_error": record.last_error,
                "jobs": jobs,
                "jobs_hidden": max(0, len(in_flight) - len(jobs)),
            }
        )
    return {
        "app": app,
        "pid": os.getpid(),
        "state": state,
        "draining": draining,
        "grace": grace,
        "grace_deadline": wall(app_deadline) if draining else None,
        "exit_code": exit_code,
        "services": services,
        "pre_drain": pre_drain,
        # When services stop serving: the end of a pre-drain delay under way.
        "pre_drain_until": None if pre_drain_until is None else wall(pre_drain_until),
        "warnings": list(warnings),
        # After an upgrade: the generation this one replaced, while it drains and after.
        "previous_generation": previous_generation,
        # How long a new generation has to be ready; None where no upgrade can start.
        "upgrade_timeout": upgrade_timeout,
    }


def _jsonable(value: object) -> object:
    """A job key or info value as JSON: strings, bools, None, finite numbers; else text."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)
