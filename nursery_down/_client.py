"""A small client for a running program's HTTP API, used by the operator commands.

Standard library only (urllib), so the core keeps trio as its one dependency.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ._exceptions import NurseryDownError

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(NurseryDownError):
    """The HTTP API could not be reached, refused the token, or refused the request."""


class ApiClient:
    """Talks to the dashboard's JSON API of one running program."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0):
        base = url or os.environ.get("NURSERY_DOWN_URL") or DEFAULT_URL
        parsed = urllib.parse.urlsplit(base)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ClientError(f"not an http(s) URL: {base!r}; expected e.g. {DEFAULT_URL}")
        # A pasted dashboard URL may carry ?token=...: use it, but never send it in a URL.
        query = urllib.parse.parse_qs(parsed.query)
        self.url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, "", "", ""))
        self.token = token or os.environ.get("NURSERY_DOWN_TOKEN") or query.get("token", [""])[0]
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
            path = f"/api/services/{urllib.parse.quote(service, safe='')}/{action}"
        return self._request("POST", path, body)

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
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
                answer: dict[str, Any] = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as exc:
            raise ClientError(self._explain(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach {self.url}: {reason}; is the program running with "
                "--dashboard, and is --url (or NURSERY_DOWN_URL) right?"
            ) from None
        except json.JSONDecodeError:
            raise ClientError(f"{self.url}{path} did not answer JSON; is --url right?") from None

    def _explain(self, exc: urllib.error.HTTPError) -> str:
        try:
            message = str(json.loads(exc.read()).get("error", ""))
        except (json.JSONDecodeError, AttributeError, OSError):
            message = ""
        if exc.code == 401:
            hint = "pass --token or set NURSERY_DOWN_TOKEN" if not self.token else "wrong token"
            return f"the token was refused ({hint})"
        return message or f"{exc.code} {exc.reason}"
