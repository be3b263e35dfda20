"""Responses shared by the routes: JSON errors, and pages for browsers without JavaScript."""

from __future__ import annotations

import json
from typing import Any

from quart import Request, Response, render_template

from ._body import FORM_TYPES


def from_plain_form(request: Request) -> bool:
    """True for a form that a browser submitted by itself (no JavaScript).

    Such a request gets a redirect or an HTML page back instead of JSON.
    """
    accept = request.headers.get("Accept", "")
    return (
        request.mimetype in FORM_TYPES
        and "text/html" in accept
        and "application/json" not in accept
    )


def wants_json(request: Request) -> bool:
    """True for API callers; False for browsers: the page, and anything asking for HTML."""
    if from_plain_form(request) or request.path in ("/", "/login"):
        return False
    accept = request.headers.get("Accept", "")
    return "text/html" not in accept or "application/json" in accept


def json_response(data: Any, status: int = 200) -> Response:
    """*data* as compact JSON (no key sorting: snapshots are built in a useful order)."""
    body = json.dumps(data, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json")


async def error_response(request: Request, status: int, message: str) -> Response:
    """``{"error": message}`` for API callers, a small HTML page for browsers."""
    if wants_json(request):
        return json_response({"error": message}, status)
    page = await render_template("error.html", status=status, message=message)
    return Response(page, status=status)
