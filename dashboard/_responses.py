"""Responses shared by the routes: JSON errors, and pages for browsers without JavaScript."""

from __future__ import annotations

import json
import math
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


def encode_json(data: Any) -> str:
    """*data* as compact, valid JSON: the one encoder of everything the dashboard sends.

    Python writes NaN and infinities as ``NaN`` and ``Infinity``, which no JSON parser
    (a browser's included) accepts: here they become ``null``. No key sorting:
    snapshots are built in a useful order.
    """
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a non-finite float somewhere
        return json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    """*value* with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def json_response(data: Any, status: int = 200) -> Response:
    """*data* as a JSON response (see :func:`encode_json`)."""
    return Response(encode_json(data), status=status, mimetype="application/json")


async def error_response(request: Request, status: int, message: str) -> Response:
    """``{"error": message}`` for API callers, a small HTML page for browsers."""
    if wants_json(request):
        return json_response({"error": message}, status)
    page = await render_template("error.html", status=status, message=message)
    return Response(page, status=status)
