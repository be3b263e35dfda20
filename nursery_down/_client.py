"""A small client for a running program's HTTP API, used by the operator commands.

Its HTTP is the standard library's (urllib), so the core keeps trio as its one
dependency. Every way the address, the token or the answer can be wrong ends in one
:class:`ClientError` whose message is a single line.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from ._exceptions import NurseryDownError
from ._spec import SERVICE_NAME, SERVICE_NAME_RULE

DEFAULT_URL = "http://127.0.0.1:8080"

#: Characters of text from the server (or of a bad URL) quoted in an error message.
QUOTED_LIMIT = 200

#: What every service in a snapshot has, and the type the commands rely on.
SERVICE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "state": str,
    "in_flight": int,
    "completed": int,
    "failed": int,
    "hard_cancelled": int,
    "restarts": int,
    "health": str,
    "oldest_job_age": (int, float, type(None)),
}


class ClientError(NurseryDownError):
    """The HTTP API could not be reached, refused the token, or refused the request."""


class ApiClient:
    """Talks to the dashboard's JSON API of one running program.

    *url* is the dashboard's address, with the path it is served under when a
    reverse proxy puts it below one (``https://ops.example.com/nursery/``); a pasted
    dashboard address with ``?token=`` gives the token too.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0):
        base = url or os.environ.get("NURSERY_DOWN_URL") or DEFAULT_URL
        self.url, token_in_url = _parse_base(base)
        self.token = _check_token(token or os.environ.get("NURSERY_DOWN_TOKEN") or token_in_url)
        self.timeout = timeout

    def snapshot(self) -> dict[str, Any]:
        """``GET /api/snapshot``."""
        return self._request("GET", "/api/snapshot")

    def action(
        self, action: str, service: str | None = None, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST one action (drain, start, restart, escalate, extend-grace); returns the snapshot."""
        if service is None:
            path = f"/api/{action}"
        else:
            path = f"/api/services/{_service_segment(service)}/{action}"
        return self._request("POST", path, body)

    def dead_letters(self, service: str, source: int) -> dict[str, Any]:
        """``GET /api/services/<service>/sources/<source>/dead``."""
        return self._request("GET", _dead_path(service, source), check=_require_dead)

    def settle_dead(
        self, service: str, source: int, action: str, ids: list[int] | None
    ) -> dict[str, Any]:
        """Requeue or discard (*action*) dead letters *ids* (all when None)."""
        body: dict[str, Any] = {"all": True} if ids is None else {"ids": ids}
        path = f"{_dead_path(service, source)}/{action}"
        return self._request("POST", path, body, check=_require_settled)

    def fleet(self) -> dict[str, Any]:
        """``GET /api/fleet``: every process of the fleet this program is in."""
        return self._request("GET", "/api/fleet", check=_require_fleet)

    def fleet_action(self, process_id: str, action: str, service: str | None) -> dict[str, Any]:
        """Ask process *process_id* of the fleet to carry out *action*; what came of it."""
        path = f"/api/fleet/processes/{urllib.parse.quote(process_id, safe='')}/{action}"
        body = {"service": service} if service else {}
        return self._request("POST", path, body, check=_require_command)

    def tasks(self) -> str:
        """The program's task tree as text (``GET /debug/tasks``)."""
        request = urllib.request.Request(self.url + "/debug/tasks", method="GET")
        request.add_header("Accept", "text/plain")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw: bytes = response.read()
        except urllib.error.HTTPError as exc:
            raise ClientError(self._explain(exc)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc or type(exc).__name__
            raise ClientError(
                f"cannot reach {self.url}: {one_line(str(reason))}; is the program running "
                "with --dashboard, and is --url (or NURSERY_DOWN_URL) right?"
            ) from None
        return raw.decode("utf-8", "replace")

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        check: Callable[[object, str], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        data = json.dumps(body or {}).encode() if method == "POST" else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ClientError(self._explain(exc)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError: what http.client says of a URL or header it cannot send.
            reason = getattr(exc, "reason", None) or exc or type(exc).__name__
            raise ClientError(
                f"cannot reach {self.url}: {one_line(str(reason))}; is the program running "
                "with --dashboard, and is --url (or NURSERY_DOWN_URL) right?"
            ) from None
        try:
            answer = json.loads(raw or b"{}")
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or absurdly nested
            raise ClientError(
                f"{self.url}{path} did not answer JSON; is --url the dashboard's address?"
            ) from None
        return (check or _require_snapshot)(answer, f"{self.url}{path}")

    def _explain(self, exc: urllib.error.HTTPError) -> str:
        try:
            answer = json.loads(exc.read())
            message = one_line(str(answer.get("error", ""))) if isinstance(answer, dict) else ""
        except (ValueError, RecursionError, OSError, http.client.HTTPException):
            message = ""
        if exc.code == 401:
            hint = "pass --token or set NURSERY_DOWN_TOKEN" if not self.token else "wrong token"
            return f"the token was refused ({hint})"
        return message or f"{exc.code} {one_line(str(exc.reason))}"


def one_line(text: str) -> str:
    """*text* from elsewhere as one short line: whitespace runs become one space, other
    unprintable characters are escaped, and the end is cut."""
    text = " ".join(text.split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= QUOTED_LIMIT else f"{text[:QUOTED_LIMIT]}..."


def _parse_base(base: str) -> tuple[str, str]:
    """The base URL to put API paths after (scheme, host, port and any path), and the
    token given as ``?token=`` (or "")."""
    shown = one_line(repr(base))
    if any(char.isspace() or not char.isprintable() for char in base):
        raise ClientError(
            f"bad URL {shown}: it contains a space or a control character; "
            f"expected e.g. {DEFAULT_URL}"
        )
    try:
        parsed = urllib.parse.urlsplit(base)
        port = parsed.port  # checks it: a port that is not a number raises here
    except ValueError as exc:
        raise ClientError(f"bad URL {shown} ({exc}); expected e.g. {DEFAULT_URL}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClientError(f"not an http(s) URL: {shown}; expected e.g. {DEFAULT_URL}")
    if port == 0:
        raise ClientError(f"bad URL {shown}: port 0; expected e.g. {DEFAULT_URL}")
    # A pasted dashboard URL may carry ?token=...: use it, but never send it in a URL.
    query = urllib.parse.parse_qs(parsed.query)
    # A dashboard behind a reverse proxy at /ops/ answers at /ops/api/...
    prefix = parsed.path.rstrip("/")
    url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, prefix, "", ""))
    return url, query.get("token", [""])[0]


def _check_token(token: str) -> str:
    """*token*, if it can go in an ``Authorization`` header as it is."""
    if token and not all(" " <= char <= "~" for char in token):
        raise ClientError(
            "the token has a character that cannot go in an HTTP header (a line break, a "
            "control or a non-ASCII character); check --token or NURSERY_DOWN_TOKEN"
        )
    return token.strip()


def _require_snapshot(answer: object, where: str) -> dict[str, Any]:
    """*answer* if it is a snapshot the commands can show, else :class:`ClientError`."""
    if not isinstance(answer, dict):
        name = "null" if answer is None else type(answer).__name__
        raise ClientError(
            f"{where} did not answer a nursery_down snapshot (a JSON {name}, not an object); "
            "is --url the dashboard's address?"
        )
    problem = None
    if not isinstance(answer.get("services"), list):
        problem = "no list of services"
    elif not all(isinstance(answer.get(key), str) for key in ("app", "state")):
        problem = "no app name or state"
    elif "pid" not in answer:
        problem = "no pid"
    else:
        for service in answer["services"]:
            if not isinstance(service, dict) or not all(
                isinstance(service.get(key), kind) and not isinstance(service.get(key), bool)
                for key, kind in SERVICE_FIELDS.items()
            ):
                problem = "a service without the fields of a snapshot"
                break
    if problem is not None:
        raise ClientError(
            f"{where} did not answer a nursery_down snapshot ({problem}); "
            "is --url the dashboard's address?"
        )
    return answer


def _require_fleet(answer: object, where: str) -> dict[str, Any]:
    """*answer* if it lists a fleet's processes, else :class:`ClientError`."""
    if (
        isinstance(answer, dict)
        and isinstance(answer.get("processes"), list)
        and isinstance(answer.get("queues"), list)
        and all(
            isinstance(process, dict)
            and isinstance(process.get("id"), str)
            and isinstance(process.get("name"), str)
            and isinstance(process.get("state"), str)
            for process in answer["processes"]
        )
    ):
        return answer
    raise ClientError(f"{where} did not answer a list of the fleet's processes")


def _require_command(answer: object, where: str) -> dict[str, Any]:
    """*answer* if it says what came of a fleet action, else :class:`ClientError`."""
    if isinstance(answer, dict) and isinstance(answer.get("result"), str):
        return answer
    raise ClientError(f"{where} did not answer what came of the action")


def _dead_path(service: str, source: int) -> str:
    return f"/api/services/{_service_segment(service)}/sources/{int(source)}/dead"


def require_service_name(service: str) -> None:
    """:class:`ClientError` for what no service can be named (asked anyway, the answer
    would only be that nothing is at that path, or that no such service runs)."""
    if not SERVICE_NAME.fullmatch(service):
        shown = service if len(service) <= 80 else f"{service[:80]}..."
        raise ClientError(
            f"no service can be named {shown!r}: service names are {SERVICE_NAME_RULE}"
        )


def _service_segment(service: str) -> str:
    """*service* as a URL path segment (:func:`require_service_name`)."""
    require_service_name(service)
    return urllib.parse.quote(service, safe="")


def _require_dead(answer: object, where: str) -> dict[str, Any]:
    """*answer* if it lists dead letters, else :class:`ClientError`."""
    if (
        isinstance(answer, dict)
        and isinstance(answer.get("dead"), list)
        and isinstance(answer.get("total"), int)
        and all(isinstance(job, dict) and "id" in job for job in answer["dead"])
    ):
        return answer
    raise ClientError(f"{where} did not answer a list of dead letters")


def _require_settled(answer: object, where: str) -> dict[str, Any]:
    """*answer* if it says how many dead letters were requeued or discarded."""
    if isinstance(answer, dict) and any(
        isinstance(answer.get(key), int) for key in ("requeued", "discarded")
    ):
        return answer
    raise ClientError(f"{where} did not say how many dead letters it settled")
