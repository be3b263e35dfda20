"""Reading an action's request body: JSON or a form, with errors that say what to send."""

from __future__ import annotations

import json
import math
from typing import Any

from quart import Request

#: Largest request body accepted; action bodies are a few bytes.
MAX_BODY_BYTES = 16 * 1024

#: Characters of a refused value quoted back in an error message.
SHOWN_LIMIT = 40

FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


class BodyError(Exception):
    """The request body cannot be used; the message says what to send instead."""


async def read_fields(request: Request, example: str) -> dict[str, Any]:
    """The fields of a JSON object or form body; empty form fields count as absent.

    *example* is shown in error messages, e.g. ``{"grace": 10}``.
    """
    mimetype = request.mimetype
    if mimetype in FORM_TYPES:
        form = await request.form
        return {key: value for key, value in form.items() if value.strip()}
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        return {}
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        got = mimetype or "a body without Content-Type"
        raise BodyError(
            f"send a JSON body with Content-Type: application/json (e.g. {example}) "
            f"or a form, not {got}"
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # (also a number beyond int()'s digits)
        raise BodyError(f"the body is not valid JSON ({exc}); send e.g. {example}") from None
    except RecursionError:
        raise BodyError(f"the body nests too deeply to read; send e.g. {example}") from None
    if not isinstance(data, dict):
        raise BodyError(f"the body must be a JSON object, e.g. {example}")
    return data


def seconds_field(fields: dict[str, Any], name: str, *, required: bool = False) -> float | None:
    """Field *name* as a finite, non-negative number of seconds (None if absent)."""
    value = fields.get(name)
    if value is None:
        if required:
            raise BodyError(f"{name!r} is required: a number of seconds, e.g. {{{name!r}: 30}}")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BodyError(f"{name!r} must be a number of seconds, got {_shown(value)}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise BodyError(f"{name!r} must be a number of seconds, got {_shown(value)}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise BodyError(f"{name!r} must be a finite number of seconds >= 0, got {_shown(value)}")
    return seconds


def text_field(fields: dict[str, Any], name: str) -> str | None:
    """Field *name* as a non-empty string (None if absent)."""
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BodyError(f"{name!r} must be a non-empty string, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    """*value* as quoted in an error: its repr, cut short if long (a 400-digit number)."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        return "a number too large to show"
    return text if len(text) <= SHOWN_LIMIT else f"{text[:SHOWN_LIMIT]}... ({len(text)} characters)"
