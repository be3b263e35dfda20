"""The audit log: every action, who asked, and what came of it (never the token).

Anything that reaches a log line from a request (a path, a header, a service name, a
reason quoting them) goes through :func:`log_safe` first, so that a request can never
write a line of its own into the log.
"""

from __future__ import annotations

import logging

from quart import Request

audit_logger = logging.getLogger("nursery_down.audit")

#: Characters of request data kept in one log field; the rest is counted, not written.
LOG_FIELD_LIMIT = 300


def log_safe(value: object) -> str:
    """*value* as text that fits on one log line and cannot pass for anything else.

    Every character that is not printable (line feeds, carriage returns, escape
    sequences, the Unicode line and paragraph separators, NEL, other controls and
    invisible formatting characters) is written as its Python escape (``\\n``,
    ``\\x1b``, ``\\u2028``), and a backslash as ``\\\\``, so an escape in the log is
    always one that was made here. Text beyond :data:`LOG_FIELD_LIMIT` characters
    is cut and counted.
    """
    text = str(value)
    cut = len(text) - LOG_FIELD_LIMIT
    if cut > 0:
        text = text[:LOG_FIELD_LIMIT]
    if not text.isprintable() or "\\" in text:
        text = "".join(map(_escape, text))
    return f"{text}... ({cut} more characters)" if cut > 0 else text


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    return char if char.isprintable() else repr(char)[1:-1]


def remote_address(request: Request) -> str:
    """The peer's address as the socket saw it (headers are not trusted for this)."""
    client = request.scope.get("client")
    return log_safe(client[0]) if client else "unknown"


def audit(what: str, who: str, result: str) -> None:
    """Record one action attempt: ``drain service workers by browser 127.0.0.1: accepted``.

    Each part is passed through :func:`log_safe`.
    """
    level = logging.INFO if result == "accepted" else logging.WARNING
    audit_logger.log(level, "%s by %s: %s", log_safe(what), log_safe(who), log_safe(result))


def action_target(action: str, service: str | None) -> str:
    """``"drain service workers"`` or ``"drain the whole app"``."""
    return f"{action} service {service}" if service else f"{action} the whole app"
