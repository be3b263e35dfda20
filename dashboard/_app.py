"""The app factory: one quart-trio app per supervisor, with every request guarded."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import TracebackType

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from nursery_down import Supervisor

from ._api import register_api
from ._audit import audit, log_safe, remote_address
from ._auth import Guard
from ._body import MAX_BODY_BYTES
from ._context import EXTENSION, DashboardContext
from ._dead import register_dead_letters
from ._fleet import register_fleet
from ._health import OPEN_PATHS, register_health
from ._metrics import metrics_registry
from ._pages import register_pages
from ._responses import error_response
from ._streams import EventStreams
from ._throttle import count_wrong_token

#: Paths that check the token themselves (or need none).
SELF_GUARDED = frozenset({"/", "/login"})

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Never tell other sites where the operator came from. Not "no-referrer": with it,
    # browsers send "Origin: null" on form posts, which the same-origin check refuses.
    "Referrer-Policy": "same-origin",
}


class DashboardApp(QuartTrio):
    """The quart-trio app, logging an unexpected error without the request's own text."""

    def log_exception(
        self,
        exception_info: tuple[type, BaseException, TracebackType] | tuple[None, None, None],
    ) -> None:
        # Quart's own line would carry the request path as it came: escape it.
        self.logger.error(
            "exception on request %s %s",
            log_safe(request.method),
            log_safe(request.path),
            exc_info=exception_info,
        )


def create_app(supervisor: Supervisor, *, token: str, allowed_hosts: Iterable[str]) -> QuartTrio:
    """The dashboard and HTTP API of *supervisor* as an ASGI app (quart-trio).

    *token* is the operator token; *allowed_hosts* the exact Host header values to
    answer (``"127.0.0.1:8080"``, ``"ops.example.com"``): others get 421, which
    defeats DNS rebinding. :func:`serve_dashboard` computes both; call this only to
    serve the app some other way.
    """
    if not token:
        raise ValueError("the dashboard needs a non-empty operator token")
    app = DashboardApp(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    guard = Guard(token, frozenset(h.lower() for h in allowed_hosts))
    app.extensions[EXTENSION] = DashboardContext(
        supervisor=supervisor,
        guard=guard,
        streams=EventStreams(supervisor),
        registry=metrics_registry(supervisor),
    )

    @app.before_request
    async def check_request() -> Response | None:
        path = request.path
        if path in OPEN_PATHS:
            return None
        host = request.headers.get("Host")
        if not host:
            return await error_response(request, 400, "the request has no Host header")
        if not guard.host_allowed(host):
            return await error_response(
                request,
                421,
                f"this dashboard does not answer to the name {host!r}; open it by the "
                "address it printed, or add the name with NURSERY_DOWN_ALLOWED_HOSTS",
            )
        address = remote_address(request)
        if not path.startswith("/static/"):
            retry = guard.failed_attempts.retry_after(address)
            if retry is not None:
                response = await error_response(
                    request,
                    429,
                    f"too many wrong tokens from {address}: try again in {math.ceil(retry)} s",
                )
                response.headers["Retry-After"] = str(math.ceil(retry))
                return response
        unsafe = request.method not in SAFE_METHODS
        if unsafe:
            reason = guard.cross_site(request.headers, host)
            if reason is not None:
                audit(
                    f"{request.method} {path}",
                    f"unknown {address}",
                    f"refused 403: {reason}",
                )
                return await error_response(
                    request, 403, f"refused: {reason}; act from the dashboard page itself"
                )
        if path in SELF_GUARDED or path.startswith("/static/"):
            return None
        credential = guard.credential(request.headers, request.cookies, host)
        if credential is None:
            if guard.presented_token(request.headers):
                count_wrong_token(guard.failed_attempts, address)
            if unsafe:
                audit(f"{request.method} {path}", f"unknown {address}", "refused 401")
            response = await error_response(
                request,
                401,
                "the operator token is missing or wrong: send 'Authorization: Bearer <token>' "
                "or open the address with ?token= that the dashboard printed at start",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="nursery_down"'
            return response
        g.credential = credential
        return None

    @app.after_request
    async def add_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-cache"
        else:
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            allowed = ", ".join(sorted(error.valid_methods))
            where = log_safe(request.path)
            message = f"{log_safe(request.method)} is not allowed on {where}; use {allowed}"
        elif isinstance(error, NotFound):
            message = (
                f"nothing at {log_safe(request.path)}; the API is GET /api/snapshot, "
                "GET /api/events, "
                "POST /api/drain, /api/restart, /api/escalate, /api/extend-grace and "
                "POST /api/services/<name>/{drain,start,restart,escalate}; a fleet "
                "is at GET /api/fleet"
            )
        response = await error_response(request, status, message)
        for name, value in error.get_headers():
            if name.lower() == "allow":
                response.headers[name] = value
        return response

    register_pages(app)
    register_api(app)
    register_fleet(app)
    register_dead_letters(app)
    register_health(app)
    return app
