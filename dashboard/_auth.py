"""Who may do what: the operator token, the session cookie, and the Host and origin checks."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Protocol
from urllib.parse import urlsplit

from itsdangerous import BadSignature, TimestampSigner

from ._address import LOOPBACK_NAMES, Address, format_host
from ._throttle import FailedAttempts

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


#: Characters an operator token needs at least when the dashboard listens beyond loopback.
MIN_TOKEN_LENGTH = 16

#: Seconds a browser session lasts after signing in.
SESSION_SECONDS = 12 * 3600.0
#: Signed-out sessions remembered (until they would have expired anyway); past this
#: many, a sign-out ends every session signed in before it.
MAX_REVOKED = 10_000


class _Signer(TimestampSigner):
    """itsdangerous' timestamped signature, on a clock of our choosing."""

    def __init__(self, key: bytes, salt: str, clock: Callable[[], float]) -> None:
        super().__init__(key, salt=salt, digest_method=hashlib.sha256)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class Guard:
    """Checks every request: Host allow-list, same-origin for actions, token or cookie.

    The session cookie holds a random session id, signed with a timestamp by a key
    derived from the token (never the token itself), and bound to the Host header it
    was issued for. It lasts :data:`SESSION_SECONDS`; signing out revokes it; a new
    token invalidates every cookie signed with the old one. The cookie's name is
    derived from the token too, so that dashboards on one host (cookies ignore the
    port) do not sign each other out.

    Wrong tokens are counted per client address (:class:`FailedAttempts`).
    """

    def __init__(
        self,
        token: str,
        allowed_hosts: frozenset[str],
        *,
        session_seconds: float = SESSION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.session_seconds = session_seconds
        self._clock = clock
        key = token.encode()
        self._key = hmac.new(key, b"nursery_down dashboard session", hashlib.sha256).digest()
        suffix = hmac.new(key, b"nursery_down cookie name", hashlib.sha256).hexdigest()[:12]
        self.cookie_name = f"nursery_down_{suffix}"
        #: Signed-out session ids and when they would have expired.
        self._revoked: dict[str, float] = {}
        #: Sessions signed in before this instant are refused (see MAX_REVOKED).
        self._not_before = 0.0
        self.failed_attempts = FailedAttempts()

    def host_allowed(self, host: str | None) -> bool:
        """True if the Host header names this dashboard (not a rebinding attacker's domain)."""
        return host is not None and host.strip().lower() in self.allowed_hosts

    def cross_site(self, headers: Headers, host: str) -> str | None:
        """Why an action request looks cross-site, or None if it came from our own page."""
        fetch_site = headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site.lower() not in SAME_SITE_FETCHES:
            return f"the browser says this request came from another site ({fetch_site!r})"
        origin = headers.get("Origin")
        if origin is not None:
            try:
                netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
            except ValueError:  # "http://[::1" and the like
                netloc = ""
            if netloc != host.strip().lower():
                return f"the request's origin {origin!r} is not this dashboard"
        return None

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison with the operator token."""
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), self.token.encode())

    def credential(
        self, headers: Headers, cookies: Mapping[str, str], host: str
    ) -> Credential | None:
        """How the request proved it knows the token, or None if it did not."""
        if self.bearer_matches(headers.get("Authorization")):
            return "api"
        cookie = cookies.get(self.cookie_name)
        if cookie and self._session_id(cookie, host) is not None:
            return "browser"
        return None

    def bearer_matches(self, authorization: str | None) -> bool:
        """True if an ``Authorization`` header value carries the operator token."""
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def presented_token(self, headers: Headers) -> bool:
        """True if the request carries a bearer token (right or wrong)."""
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and bool(value.strip())

    # -- sessions ---------------------------------------------------------------------

    def new_session(self, host: str) -> str:
        """A session cookie value for a browser that just signed in by *host*."""
        return self._signer(host).sign(secrets.token_urlsafe(16)).decode()

    def end_session(self, cookie: str | None, host: str) -> bool:
        """Revoke the session in *cookie*; True if it was one of ours and still valid."""
        session = self._session_id(cookie, host) if cookie else None
        if session is None:
            return False
        now = self._clock()
        if len(self._revoked) >= MAX_REVOKED:
            self._revoked = {s: end for s, end in self._revoked.items() if end > now}
        if len(self._revoked) >= MAX_REVOKED:
            # Remembering more would let sign-outs fill the memory: end them all.
            self._revoked.clear()
            self._not_before = now
        else:
            self._revoked[session] = now + self.session_seconds
        return True

    def _session_id(self, cookie: str, host: str) -> str | None:
        try:
            value, signed_at = self._signer(host).unsign(
                cookie, max_age=int(self.session_seconds), return_timestamp=True
            )
        except BadSignature:  # forged, expired, for another Host, or another token's
            return None
        session = value.decode("ascii", "replace")
        if signed_at.timestamp() <= self._not_before or session in self._revoked:
            return None
        return session

    def _signer(self, host: str) -> _Signer:
        return _Signer(self._key, f"nursery_down session {host.strip().lower()}", self._clock)
