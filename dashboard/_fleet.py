"""The fleet page and API: every process of the fleet, and actions on any of them.

Served by any process that is in a fleet (its supervisor has a FleetMember). The
actions travel through the fleet's database: the process answering the request never
needs to reach the one it acts on.
"""

from __future__ import annotations

import re
from typing import Any

from quart import Quart, g, redirect, render_template, request
from quart.typing import ResponseReturnValue

from nursery_down import (
    ConfigurationError,
    FleetError,
    FleetUnavailableError,
    InvalidTransitionError,
    UnknownProcessError,
)

from ._audit import audit, log_safe, remote_address
from ._body import BodyError, read_fields, text_field
from ._context import dashboard_context
from ._responses import error_response, from_plain_form, json_response
from ._view import clock, duration

#: What an operator can ask of a process (``start`` needs a service).
FLEET_ACTIONS = ("drain", "start", "restart", "escalate", "upgrade")

#: The shape of a process id (the fleet makes 12 hex digits; anything else is unknown).
PROCESS_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

NOT_IN_A_FLEET = (
    "this process is not in a fleet: run it with a fleet database (nd.run(sup, fleet=DSN), "
    "nursery-down run --fleet DSN, or NURSERY_DOWN_FLEET), or give a worker pool a "
    "PostgresQueue"
)


def service_actions(state: str) -> tuple[str, ...]:
    """The actions that make sense for a service in *state* (fleet.js does the same)."""
    if state in ("stopped", "failed"):
        return ("start",)
    if state == "draining":
        return ()
    return ("drain", "restart")


def register_fleet(app: Quart) -> None:
    """Add ``/fleet``, ``GET /api/fleet`` and ``POST /api/fleet/processes/<id>/<action>``."""
    supervisor = dashboard_context(app).supervisor

    async def fleet_view() -> dict[str, Any] | ResponseReturnValue:
        member = supervisor._fleet
        if member is None:
            return await error_response(request, 404, NOT_IN_A_FLEET)
        try:
            view: dict[str, Any] = await member.view()
        except FleetUnavailableError as exc:
            return await error_response(request, 503, str(exc))
        except FleetError as exc:
            return await error_response(request, 502, str(exc))
        return view

    @app.get("/fleet")
    async def fleet_page() -> ResponseReturnValue:
        view = await fleet_view()
        if not isinstance(view, dict):
            return view
        return await render_template(
            "fleet.html",
            app=supervisor.name,
            fleet=view,
            duration=duration,
            clock=clock,
            service_actions=service_actions,
        )

    @app.get("/api/fleet")
    async def fleet_api() -> ResponseReturnValue:
        view = await fleet_view()
        return json_response(view) if isinstance(view, dict) else view

    @app.post(f"/api/fleet/processes/<process_id>/<any({', '.join(FLEET_ACTIONS)}):action>")
    async def fleet_action(process_id: str, action: str) -> ResponseReturnValue:
        who = f"{g.credential} {remote_address(request)}"
        service: str | None = None
        status, message = 202, ""
        answer: dict[str, Any] = {}
        member = supervisor._fleet
        try:
            fields = await read_fields(request, '{"service": "workers"}')
            service = text_field(fields, "service") or None
            if member is None:
                status, message = 404, NOT_IN_A_FLEET
            elif not PROCESS_ID.match(process_id):
                raise UnknownProcessError(process_id)
            else:
                answer = await member.ask(process_id, action, service, actor=who)
                result = answer["result"]
                if result is not None and result.startswith("refused: "):
                    status, message = 409, result.removeprefix("refused: ")
        except UnknownProcessError as exc:
            status, message = 404, str(exc)
        except InvalidTransitionError as exc:
            status, message = 409, str(exc)
        except (BodyError, ConfigurationError) as exc:
            status, message = 400, str(exc)
        except FleetUnavailableError as exc:
            status, message = 503, str(exc)
        except FleetError as exc:
            status, message = 502, str(exc)
        target = f"service {service}" if service else "the whole app"
        outcome = "accepted" if status == 202 else f"refused {status}: {message}"
        audit(f"fleet: {action} {target} of process {log_safe(process_id)}", who, outcome)
        if status != 202:
            return await error_response(request, status, message)
        if from_plain_form(request):
            return redirect("/fleet", 303)
        if answer["result"] is None:
            answer["result"] = (
                "asked; the process has not answered yet (it acts when it next reads its commands)"
            )
        return json_response(answer, 202)
