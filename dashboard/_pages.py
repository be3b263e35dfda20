"""The operator's page, signing in with the token, and signing out."""

from __future__ import annotations

from urllib.parse import quote

from quart import Quart, Response, g, redirect, render_template, request
from quart.typing import ResponseReturnValue
from werkzeug.wrappers import Response as WerkzeugResponse

from ._audit import audit, remote_address
from ._context import dashboard_context
from ._responses import from_plain_form, json_response
from ._streams import live_snapshot
from ._throttle import count_wrong_token
from ._view import page_context


def path_segment(name: str) -> str:
    """*name* percent-encoded as one segment of a URL path (``/`` and ``#`` included).

    Service names are restricted at registration to characters that need no encoding;
    the page encodes them anyway, so that no name can ever address another route.
    """
    return quote(name, safe="")


def register_pages(app: Quart) -> None:
    """Add ``/``, ``/login`` and ``/logout`` to *app*, and the ``path_segment`` filter."""
    app.add_template_filter(path_segment)
    context = dashboard_context(app)
    guard = context.guard
    supervisor = context.supervisor

    def signed_in() -> WerkzeugResponse:
        audit("sign in", f"browser {remote_address(request)}", "accepted")
        # The redirect drops the token from the address bar and the history.
        response = redirect("/", 303)
        response.set_cookie(
            guard.cookie_name,
            guard.new_session(request.headers.get("Host", "")),
            max_age=int(guard.session_seconds),
            httponly=True,
            samesite="Strict",
            path="/",
        )
        return response

    async def login_page(message: str | None) -> ResponseReturnValue:
        if message is not None:
            address = remote_address(request)
            audit("sign in", f"unknown {address}", "refused 401: wrong token")
            count_wrong_token(guard.failed_attempts, address)
        html = await render_template("login.html", app=supervisor.name, message=message)
        return html, 401, {"WWW-Authenticate": 'Bearer realm="nursery_down"'}

    @app.get("/")
    async def index() -> ResponseReturnValue:
        token = request.args.get("token")
        if token is not None:
            if guard.token_matches(token):
                return signed_in()
            return await login_page("That token is not this dashboard's.")
        host = request.headers.get("Host", "")
        if guard.credential(request.headers, request.cookies, host) is None:
            return await login_page(None)
        snapshot = live_snapshot(supervisor)
        events = [event.to_dict() for event in supervisor.events()]
        return await render_template(
            "index.html", **page_context(snapshot, events), in_fleet=supervisor._fleet is not None
        )

    @app.post("/login")
    async def login() -> ResponseReturnValue:
        form = await request.form
        if guard.token_matches(form.get("token", "").strip()):
            return signed_in()
        return await login_page("That token is not this dashboard's.")

    @app.post("/logout")
    async def logout() -> ResponseReturnValue:
        # Reached only with the token or a valid session, from the page's own origin.
        cookie = request.cookies.get(guard.cookie_name)
        ended = guard.end_session(cookie, request.headers.get("Host", ""))
        who = f"{g.credential} {remote_address(request)}"
        audit("sign out" if ended else "sign out (no session to end)", who, "accepted")
        response: WerkzeugResponse | Response
        if from_plain_form(request):
            response = redirect("/", 303)
        else:
            response = json_response({"signed_out": ended})
        response.delete_cookie(guard.cookie_name, path="/", httponly=True, samesite="Strict")
        return response
