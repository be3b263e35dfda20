"""Who may do what: the operator token, the session cookie, and the Host and origin checks."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

from ._address import LOOPBACK_NAMES, Address, format_host

#: How a request proved it knows the token: a header (scripts) or the cookie (a browser).
Credential = Literal["api", "browser"]


class Headers(Protocol):
    """Request headers: a case-insensitive lookup."""

    def get(self, key: str, /) -> str | None: ...


#: Sec-Fetch-Site values of requests a browser made from our own page, or typed by hand.
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})


def allowed_host_headers(address: Address, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host header values to accept: the bound address and the loopback names with
    the port, and each *extra* name (``ops.example.com`` or ``ops.example.com:443``).

    A name without a port is accepted bare too, as a reverse proxy may send it.
    """
    port = address.port
    names = {f"{name}:{port}" for name in LOOPBACK_NAMES}
    names.add(f"{format_host(address.host)}:{port}")
    names.add(f"{format_host(address.ip)}:{port}")
    for name in extra:
        name = name.strip().lower()
        if not name:
            continue
        if name.rpartition(":")[2].isdigit() and not name.endswith("]"):
            names.add(name)
        else:
            names.update({name, f"{name}:{port}"})
    if port == 80:  # browsers leave the default port out
        names.update(name.rpartition(":")[0] for name in list(names) if name.endswith(":80"))
    return frozenset(name.lower() for name in names)


@dataclass(frozen=True)
class Guard:
    """Checks every request: Host allow-list, same-origin for actions, token or cookie.

    The session cookie holds a value derived from the token, never the token itself.
    Its name is derived from the token too, so that dashboards on one host (cookies
    ignore the port) do not sign each other out.
    """

    token: str
    allowed_hosts: frozenset[str]
    session: str = field(init=False)
    cookie_name: str = field(init=False)

    def __post_init__(self) -> None:
        key = self.token.encode()
        session = hmac.new(key, b"nursery_down dashboard session", hashlib.sha256).hexdigest()
        suffix = hmac.new(key, b"nursery_down cookie name", hashlib.sha256).hexdigest()[:12]
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "cookie_name", f"nursery_down_{suffix}")

    def host_allowed(self, host: str | None) -> bool:
        """True if the Host header names this dashboard (not a rebinding attacker's domain)."""
        return host is not None and host.strip().lower() in self.allowed_hosts

    def cross_site(self, headers: Headers, host: str) -> str | None:
        """Why an action request looks cross-site, or None if it came from our own page."""
        fetch_site = headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site.lower() not in SAME_SITE_FETCHES:
            return f"the browser says this request came from another site ({fetch_site})"
        origin = headers.get("Origin")
        if origin is not None:
            netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
            if netloc != host.strip().lower():
                return f"the request's origin {origin!r} is not this dashboard"
        return None

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison with the operator token."""
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), self.token.encode())

    def credential(self, headers: Headers, cookies: Mapping[str, str]) -> Credential | None:
        """How the request proved it knows the token, or None if it did not."""
        authorization = headers.get("Authorization") or ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(value.strip()):
            return "api"
        cookie = cookies.get(self.cookie_name)
        if cookie and hmac.compare_digest(cookie.encode(), self.session.encode()):
            return "browser"
        return None
