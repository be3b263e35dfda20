"""The audit log: every action, who asked, and what came of it (never the token)."""

from __future__ import annotations

import logging

from quart import Request

audit_logger = logging.getLogger("nursery_down.audit")


def remote_address(request: Request) -> str:
    """The peer's address as the socket saw it (headers are not trusted for this)."""
    client = request.scope.get("client")
    return str(client[0]) if client else "unknown"


def audit(what: str, who: str, result: str) -> None:
    """Record one action attempt: ``drain service workers by browser 127.0.0.1: accepted``."""
    level = logging.INFO if result == "accepted" else logging.WARNING
    audit_logger.log(level, "%s by %s: %s", what, who, result)


def action_target(action: str, service: str | None) -> str:
    """``"drain service workers"`` or ``"drain the whole app"``."""
    return f"{action} service {service}" if service else f"{action} the whole app"
