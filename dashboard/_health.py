"""Probes and metrics: ``/livez``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, request

from nursery_down import UnknownServiceError

from ._audit import log_safe
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
        # 503 while starting or draining, and while a service that counts for readiness
        # is not RUNNING and healthy; ?service=NAME answers for that one service.
        service = request.args.get("service")
        try:
            answer = supervisor.readiness(service)
        except UnknownServiceError as exc:
            return json_response({"ready": False, "error": log_safe(str(exc))}, 404)
        return json_response(answer, 200 if answer["ready"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(context.registry), content_type=CONTENT_TYPE_LATEST)
