"""What every route of one dashboard shares."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from quart import Quart

from nursery_down import Supervisor

from ._auth import Guard
from ._streams import EventStreams

EXTENSION = "nursery_down"


@dataclass(frozen=True, slots=True)
class DashboardContext:
    """The supervisor, the request guard, the open event streams and the metrics registry."""

    supervisor: Supervisor
    guard: Guard
    streams: EventStreams
    registry: CollectorRegistry


def dashboard_context(app: Quart) -> DashboardContext:
    """The context that :func:`create_app` attached to *app*."""
    context = app.extensions[EXTENSION]
    assert isinstance(context, DashboardContext)
    return context
