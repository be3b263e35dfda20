"""The JSON API: the snapshot, the event stream, and the actions.

Actions answer ``202 Accepted`` with the new snapshot once the supervisor took them
(a drain has begun, not finished). A form posted by a browser without JavaScript
is redirected back to the page instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.typing import HTTPScope
from quart import Quart, g, redirect, request
from quart.typing import ResponseReturnValue

from nursery_down import (
    ConfigurationError,
    InvalidTransitionError,
    ServiceState,
    UnknownServiceError,
    UpgradeError,
)

from ._audit import action_target, audit, log_safe, remote_address
from ._body import BodyError, read_fields, seconds_field, text_field
from ._context import DashboardContext, dashboard_context
from ._inspect import register_inspect
from ._responses import encode_json, error_response, from_plain_form, json_response
from ._streams import live_snapshot
from ._view import JOBS_SHOWN

#: Runs one action on behalf of *actor* (``"browser 127.0.0.1"``); may raise BodyError.
#: Returns what came of it when that is worth saying (``"outcome"`` in the answer).
Action = Callable[[dict[str, Any], str], Awaitable[str | None]]

#: A deadline counts as moved when it moved by more than this (seconds): two snapshots
#: convert the same deadline to wall-clock time a few microseconds apart.
MOVED = 0.01

SERVICE_ACTIONS = ("drain", "start", "restart", "escalate")

#: Digits accepted in ``?max_jobs=`` (no service holds a billion jobs).
MAX_JOBS_DIGITS = 9


def parse_max_jobs(text: str) -> int | None:
    """``?max_jobs=``: a whole number, or ``all`` (None); ValueError saying why not."""
    if text == "all":
        return None
    if text.isascii() and text.isdigit() and len(text) <= MAX_JOBS_DIGITS:
        return int(text)
    shown = text if len(text) <= MAX_JOBS_DIGITS else f"{text[:MAX_JOBS_DIGITS]}..."
    raise ValueError(
        f"max_jobs must be a whole number (at most {MAX_JOBS_DIGITS} digits) or "
        f"'all', got {shown!r}"
    )


def snapshot_answer(context: DashboardContext) -> Callable[[HTTPScope], bytes | None]:
    """The body of ``GET /api/snapshot`` for a request that needs nothing of the app.

    The API's most frequent call, answered by the admission wrapper without a pass
    through quart (its request context, hooks and response objects cost more than the
    snapshot itself). Only a plain, valid request qualifies: an allowed Host, the
    operator token as a bearer token, no throttling of its address, no query but a
    valid ``max_jobs``. For anything else the answer is None and the app handles the
    request, with its errors, its counting of wrong tokens and its session cookies.
    """
    guard = context.guard
    supervisor = context.supervisor
    shown = str(JOBS_SHOWN).encode()

    def answer(scope: HTTPScope) -> bytes | None:
        if (
            scope["method"] != "GET"
            or scope["path"] != "/api/snapshot"
            or scope.get("root_path")  # mounted below a prefix: the app maps the path
        ):
            return None
        query = scope["query_string"]
        if query:
            name, _, value = query.partition(b"=")
            if name != b"max_jobs" or b"&" in value or b"%" in value or b"+" in value:
                return None
        else:
            value = shown
        host = authorization = None
        for name, header in scope["headers"]:
            if name == b"host":
                if host is not None:
                    return None
                host = header.decode("latin-1")
            elif name == b"authorization":
                if authorization is not None:
                    return None
                authorization = header.decode("latin-1")
        client = scope.get("client")
        address = log_safe(client[0]) if client else "unknown"
        if (
            not guard.host_allowed(host)
            or guard.failed_attempts.retry_after(address) is not None
            or not guard.bearer_matches(authorization)
        ):
            return None
        try:
            max_jobs = parse_max_jobs(value.decode("latin-1"))
            return encode_json(supervisor.snapshot(max_jobs=max_jobs)).encode()
        except Exception:  # a bad max_jobs, or a bug: the app answers, and logs it its way
            return None

    return answer


def register_api(app: Quart) -> None:
    """Add the ``/api/...`` routes to *app* (and ``/debug/tasks``)."""
    context = dashboard_context(app)
    supervisor = context.supervisor
    register_inspect(app)

    @app.get("/api/snapshot")
    async def snapshot() -> ResponseReturnValue:
        # Most snapshot requests are answered before the app (see snapshot_answer);
        # this route answers those that need it: a session cookie, an error.
        try:
            max_jobs = parse_max_jobs(request.args.get("max_jobs", str(JOBS_SHOWN)))
        except ValueError as exc:
            return await error_response(request, 400, str(exc))
        return json_response(supervisor.snapshot(max_jobs=max_jobs))

    @app.get("/api/events")
    async def events() -> ResponseReturnValue:
        response = app.response_class(context.streams.stream(), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"  # keep reverse proxies from buffering it
        # A stream ends only when the dashboard closes (or the client goes): then the
        # connection has nothing left to do, and closing it at once speeds shutdown.
        response.headers["Connection"] = "close"
        response.timeout = None  # the default response timeout would cut the stream at 60 s
        return response

    @app.post("/api/drain")
    async def drain_app() -> ResponseReturnValue:
        async def run(fields: dict[str, Any], actor: str) -> str | None:
            grace = seconds_field(fields, "grace")
            before = supervisor.snapshot(max_jobs=0)
            await supervisor.drain(grace=grace, actor=actor)
            return drain_outcome(before, supervisor.snapshot(max_jobs=0))

        return await perform("drain", None, run, '{"grace": 10}')

    @app.post("/api/restart")
    async def restart_app() -> ResponseReturnValue:
        async def run(fields: dict[str, Any], actor: str) -> None:
            await supervisor.restart(actor=actor)
            return None

        return await perform("restart", None, run, "{}")

    @app.post("/api/escalate")
    async def escalate_app() -> ResponseReturnValue:
        async def run(fields: dict[str, Any], actor: str) -> None:
            await supervisor.escalate(actor=actor)
            return None

        return await perform("escalate", None, run, "{}")

    @app.post("/api/upgrade")
    async def upgrade() -> ResponseReturnValue:
        new_pid: dict[str, int] = {}

        async def run(fields: dict[str, Any], actor: str) -> None:
            # Answers once the new generation is ready (this one then drains) or failed.
            new_pid["upgraded_to"] = await supervisor.upgrade(actor=actor)
            return None

        return await perform("upgrade", None, run, "{}", extra=new_pid)

    @app.post("/api/extend-grace")
    async def extend_grace() -> ResponseReturnValue:
        service = None

        async def run(fields: dict[str, Any], actor: str) -> None:
            nonlocal service
            seconds = seconds_field(fields, "seconds", required=True)
            assert seconds is not None
            service = text_field(fields, "service")
            await supervisor.extend_grace(seconds, service, actor=actor)
            return None

        return await perform("extend_grace", lambda: service, run, '{"seconds": 30}')

    @app.post(f"/api/services/<name>/<any({', '.join(SERVICE_ACTIONS)}):action>")
    async def service_action(name: str, action: str) -> ResponseReturnValue:
        async def run(fields: dict[str, Any], actor: str) -> str | None:
            if action in ("drain", "escalate"):
                state = supervisor.state_of(name)
                if state in (ServiceState.STOPPED, ServiceState.FAILED):
                    # The Python API takes this as a no-op; an operator is told.
                    again = "start it" if state is ServiceState.STOPPED else "start it again"
                    raise InvalidTransitionError(
                        f"nothing to {action}: service {name!r} is {state.value}; {again} first"
                    )
            if action == "drain":
                grace = seconds_field(fields, "grace")
                before = supervisor.snapshot(max_jobs=0)
                await supervisor.drain(name, grace=grace, actor=actor)
                return drain_outcome(before, supervisor.snapshot(max_jobs=0), name)
            if action == "start":
                await supervisor.start(name, actor=actor)
            elif action == "restart":
                await supervisor.restart(name, actor=actor)
            else:
                await supervisor.escalate(name, actor=actor)
            return None

        example = '{"grace": 10}' if action == "drain" else "{}"
        return await perform(action, name, run, example)

    async def perform(
        action: str,
        service: str | Callable[[], str | None] | None,
        run: Action,
        example: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> ResponseReturnValue:
        who = f"{g.credential} {remote_address(request)}"
        status = 202
        outcome = None
        try:
            fields = await read_fields(request, example)
            outcome = await run(fields, who)
        except UnknownServiceError as exc:
            status, message = 404, str(exc)
        except InvalidTransitionError as exc:
            status, message = 409, str(exc)
        except UpgradeError as exc:  # the new generation failed; this one keeps serving
            status, message = 502, str(exc)
        except (BodyError, ConfigurationError) as exc:
            status, message = 400, str(exc)
        target = service() if callable(service) else service
        result = "accepted" if status == 202 else f"refused {status}: {message}"
        audit(action_target(action, target), who, result)
        if status != 202:
            return await error_response(request, status, message)
        if from_plain_form(request):
            return redirect("/", 303)
        answer = {**live_snapshot(supervisor), **(extra or {})}
        if outcome is not None:
            answer["outcome"] = outcome
        return json_response(answer, 202)


def drain_outcome(before: dict[str, Any], after: dict[str, Any], service: str | None = None) -> str:
    """What a drain did, from the snapshots taken just before and after it.

    A drain of something already draining tightens its deadline when the grace asked
    for ends earlier, and never moves it later: the answer says which happened.
    """
    if service is None:
        was, now = before, after
        what = "the whole app"
    else:
        was = next(s for s in before["services"] if s["name"] == service)
        now = next(s for s in after["services"] if s["name"] == service)
        what = f"service {service}"
    if was["state"] != "draining":
        return f"{what}: the drain began"
    old, new = was["grace_deadline"], now["grace_deadline"]
    if old is not None and new is not None and old - new > MOVED:
        return (
            f"{what} was already draining: the grace asked for ends sooner, so the "
            f"deadline moved {old - new:.1f} s earlier"
        )
    return (
        f"{what} was already draining: the deadline stays, as a drain never moves it "
        "later (extend-grace does)"
    )
