"""Dead letters of a service's job sources: list them, requeue or discard them.

``GET /api/services/<name>/sources/<n>/dead`` lists them with an escaped, cut preview
of each payload (the whole payload of one with ``?full=<id>``); ``POST .../requeue``
and ``POST .../discard`` act on the ids in the body (``{"ids": [17, 18]}``) or on all
(``{"all": true}``: an empty body does nothing, so that no stray POST empties a list).
"""

from __future__ import annotations

import json
from typing import Any

from quart import Quart, g, redirect, request
from quart.typing import ResponseReturnValue

from nursery_down import (
    ConfigurationError,
    InvalidTransitionError,
    NurseryDownError,
    UnknownServiceError,
    UnknownSourceError,
)

from ._audit import audit, remote_address
from ._body import BodyError, read_fields
from ._context import dashboard_context
from ._responses import error_response, from_plain_form, json_response

#: Dead letters listed at most (the oldest first); the rest are counted.
DEAD_SHOWN = 200
#: Characters of a payload's JSON shown in a list.
PREVIEW_LIMIT = 120
#: Ids accepted in one requeue or discard.
IDS_LIMIT = 10_000


def preview(payload: object) -> str:
    """A payload as a short line of JSON, cut with an ellipsis."""
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = repr(payload)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= PREVIEW_LIMIT else text[: PREVIEW_LIMIT - 1] + "…"


def register_dead_letters(app: Quart) -> None:
    """Add the dead-letter routes to *app*."""
    supervisor = dashboard_context(app).supervisor

    @app.get("/api/services/<name>/sources/<int:index>/dead")
    async def list_dead(name: str, index: int) -> ResponseReturnValue:
        full = request.args.get("full")
        try:
            dead = await supervisor.dead_letters(name, source=index)
        except (UnknownServiceError, UnknownSourceError) as exc:
            return await error_response(request, 404, str(exc))
        except InvalidTransitionError as exc:
            return await error_response(request, 409, str(exc))
        except NurseryDownError as exc:  # the source's own trouble (database away...)
            return await error_response(request, 503, str(exc))
        if full is not None:
            found = [job for job in dead if str(job.id) == full]
            if not found:
                return await error_response(
                    request, 404, f"no dead letter {full[:40]!r} in this source"
                )
            (job,) = found[:1]
            return json_response({"id": job.id, "payload": job.payload})
        return json_response(
            {
                "service": name,
                "source": index,
                "total": len(dead),
                "dead": [
                    {
                        "id": job.id,
                        "preview": preview(job.payload),
                        "attempts": job.attempts,
                        "error": job.error,
                        "died_at": job.died_at,
                    }
                    for job in dead[:DEAD_SHOWN]
                ],
            }
        )

    @app.post("/api/services/<name>/sources/<int:index>/dead/<any(requeue, discard):action>")
    async def settle_dead(name: str, index: int, action: str) -> ResponseReturnValue:
        who = f"{g.credential} {remote_address(request)}"
        status, message, count = 202, "", 0
        try:
            fields = await read_fields(request, '{"ids": [17, 18]} or {"all": true}')
            ids = _ids(fields)
            if action == "requeue":
                count = await supervisor.requeue_dead_letters(name, ids, source=index, actor=who)
            else:
                count = await supervisor.discard_dead_letters(name, ids, source=index, actor=who)
        except (UnknownServiceError, UnknownSourceError) as exc:
            status, message = 404, str(exc)
        except InvalidTransitionError as exc:
            status, message = 409, str(exc)
        except (BodyError, ConfigurationError) as exc:
            status, message = 400, str(exc)
        except NurseryDownError as exc:
            status, message = 503, str(exc)
        result = "accepted" if status == 202 else f"refused {status}: {message}"
        audit(f"{action} dead letters of source {index} of service {name}", who, result)
        if status != 202:
            return await error_response(request, status, message)
        if from_plain_form(request):
            return redirect("/", 303)
        done = "requeued" if action == "requeue" else "discarded"
        return json_response({"service": name, "source": index, done: count}, 202)


def _ids(fields: dict[str, Any]) -> list[int] | None:
    """The ids to act on, None for all; refuses a body that names neither."""
    if fields.get("all") in (True, "true", "on", "1"):
        if "ids" in fields:
            raise BodyError("send either 'ids' or 'all', not both")
        return None
    raw = fields.get("ids")
    if isinstance(raw, str):  # a form: "17,18"
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list) or not raw:
        raise BodyError('name the dead letters: {"ids": [17, 18]}, or {"all": true} for every one')
    if len(raw) > IDS_LIMIT:
        raise BodyError(f"at most {IDS_LIMIT} ids at once, got {len(raw)}")
    ids: list[int] = []
    for value in raw:
        if isinstance(value, bool):
            raise BodyError(f"ids are whole numbers, got {value!r}")
        if isinstance(value, int) and abs(value) < 2**63:
            ids.append(value)
        elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
            ids.append(int(value))
        else:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise BodyError(f"ids are whole numbers, got {shown}")
    return ids
