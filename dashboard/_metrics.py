"""``GET /metrics``: the supervisor's state in Prometheus text, read fresh at each scrape."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nursery_down import ServiceState, Supervisor

APP_STATES = ("starting", "running", "draining", "stopped")


class SupervisorCollector:
    """Turns a snapshot and the event history into metric families; keeps no state itself."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list[Metric]:
        # Lets the registry check names without taking a snapshot at registration.
        return list(self._families({"app": "", "state": "", "services": []}, []))

    def collect(self) -> Iterator[Metric]:
        supervisor = self._supervisor
        snapshot = supervisor.snapshot(max_jobs=0)
        events = [event.to_dict() for event in supervisor.events()]
        return self._families(snapshot, events)

    def _families(self, snapshot: dict[str, Any], events: list[dict[str, Any]]) -> Iterator[Metric]:
        app = snapshot["app"]
        app_state = GaugeMetricFamily(
            "nursery_down_app_state",
            "1 for the application's current state",
            labels=["app", "state"],
        )
        for name in APP_STATES:
            app_state.add_metric([app, name], 1.0 if snapshot["state"] == name else 0.0)
        yield app_state

        labels = ["app", "service"]
        state = GaugeMetricFamily(
            "nursery_down_service_state",
            "1 for each service's current state",
            labels=["app", "service", "state"],
        )
        in_flight = GaugeMetricFamily(
            "nursery_down_service_in_flight", "Jobs in flight now", labels=labels
        )
        oldest = GaugeMetricFamily(
            "nursery_down_service_oldest_job_age_seconds",
            "Age of the oldest job in flight (0 when none)",
            labels=labels,
        )
        completed = CounterMetricFamily(
            "nursery_down_jobs_completed", "Jobs that finished", labels=labels
        )
        failed = CounterMetricFamily(
            "nursery_down_jobs_failed", "Jobs that raised an error", labels=labels
        )
        hard_cancelled = CounterMetricFamily(
            "nursery_down_jobs_hard_cancelled",
            "Jobs cancelled at the grace deadline (or by escalation)",
            labels=labels,
        )
        restarts = CounterMetricFamily(
            "nursery_down_service_restarts", "Times the service was started again", labels=labels
        )
        drain = GaugeMetricFamily(
            "nursery_down_service_drain_duration_seconds",
            "How long the current drain has lasted, or how long the last one took",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "nursery_down_service_healthy",
            "1 while the service's health is ok, 0 while it is not",
            labels=labels,
        )
        source_jobs = GaugeMetricFamily(
            "nursery_down_source_jobs",
            "Jobs in each of a service's job sources, by state (queued, leased, done, dead)",
            labels=["app", "service", "source", "state"],
        )
        drains = _drain_durations(events)
        for service in snapshot["services"]:
            name = service["name"]
            for value in ServiceState:
                flag = 1.0 if service["state"] == value.value else 0.0
                state.add_metric([app, name, value.value], flag)
            in_flight.add_metric([app, name], service["in_flight"])
            oldest.add_metric([app, name], service["oldest_job_age"] or 0.0)
            completed.add_metric([app, name], service["completed"])
            failed.add_metric([app, name], service["failed"])
            hard_cancelled.add_metric([app, name], service["hard_cancelled"])
            restarts.add_metric([app, name], service["restarts"])
            healthy.add_metric([app, name], 1.0 if service["health"] == "ok" else 0.0)
            for source in service.get("sources", []):
                for key in ("queued", "leased", "done", "dead"):
                    if source[key] is not None:
                        source_jobs.add_metric([app, name, source["name"], key], source[key])
            if name in drains:
                drain.add_metric([app, name], drains[name])
        yield from (
            state,
            in_flight,
            oldest,
            completed,
            failed,
            hard_cancelled,
            restarts,
            healthy,
            source_jobs,
            drain,
        )


def _drain_durations(events: list[dict[str, Any]]) -> dict[str, float]:
    """Per service: seconds from entering DRAINING to leaving it (to now if still draining)."""
    began: dict[str, float] = {}
    durations: dict[str, float] = {}
    for event in events:
        service = event["service"]
        if event["kind"] != "state" or service is None:
            continue
        if event["state"] == ServiceState.DRAINING.value:
            began[service] = event["time"]
        elif event["previous"] == ServiceState.DRAINING.value and service in began:
            durations[service] = event["time"] - began.pop(service)
    now = time.time()
    for service, start in began.items():
        durations[service] = now - start
    return durations


def metrics_registry(supervisor: Supervisor) -> CollectorRegistry:
    """A private registry (not the process-wide default) holding *supervisor*'s metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(supervisor))
    return registry
