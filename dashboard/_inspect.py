"""What the program is doing: drain reports, where a job waits, and every task's await.

``GET /api/drains`` lists the last drain reports; ``GET /api/jobs/stack?service=&key=``
(or ``/api/services/<name>/jobs/<key>/stack``) gives the chain of awaits of one
in-flight job's task; ``GET /debug/tasks`` is the whole trio task tree as text. All
are token-protected like every other read, and none shows a local variable's value.
"""

from __future__ import annotations

from quart import Quart, Response, request
from quart.typing import ResponseReturnValue

from nursery_down import UnknownJobError, UnknownServiceError

from ._context import dashboard_context
from ._responses import error_response, json_response


def register_inspect(app: Quart) -> None:
    """Add ``/api/drains``, the job stack routes and ``/debug/tasks`` to *app*."""
    supervisor = dashboard_context(app).supervisor

    @app.get("/api/drains")
    async def drains() -> ResponseReturnValue:
        return json_response({"drains": supervisor.drain_reports()})

    async def stack(service: str, key: str) -> ResponseReturnValue:
        try:
            return json_response(supervisor.job_stack(service, key))
        except (UnknownServiceError, UnknownJobError) as exc:
            return await error_response(request, 404, str(exc))

    @app.get("/api/jobs/stack")
    async def stack_by_query() -> ResponseReturnValue:
        service, key = request.args.get("service"), request.args.get("key")
        if service is None or key is None:
            return await error_response(
                request, 400, "give the job as ?service=NAME&key=KEY (its key as text)"
            )
        return await stack(service, key)

    @app.get("/api/services/<name>/jobs/<path:key>/stack")
    async def stack_by_path(name: str, key: str) -> ResponseReturnValue:
        return await stack(name, key)

    @app.get("/debug/tasks")
    async def tasks() -> ResponseReturnValue:
        response = Response(supervisor.task_tree(), mimetype="text/plain")
        response.headers["Cache-Control"] = "no-store"
        return response
