"""Probes and metrics: ``/livez``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response

from ._context import dashboard_context
from ._responses import json_response

#: Probes answer without the token and whatever the Host header: they reveal only the
#: app state, and orchestrators call them by IP address.
OPEN_PATHS = frozenset({"/livez", "/readyz"})


def register_health(app: Quart) -> None:
    """Add the probes and ``/metrics`` to *app*."""
    context = dashboard_context(app)
    supervisor = context.supervisor

    @app.get("/livez")
    async def livez() -> Response:
        # Answering at all proves the event loop is alive.
        return Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        state = supervisor.snapshot(max_jobs=0)["state"]
        return json_response(
            {"ready": state == "running", "state": state}, 200 if state == "running" else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(context.registry), content_type=CONTENT_TYPE_LATEST)
