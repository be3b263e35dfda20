"""Service health: what each service reports or its check finds, and who may wait on it.

One :class:`HealthBoard` per supervisor owns every service's health. A service sets
its own with ``ctx.set_health()`` (active); a service declared with ``health=check``
has the supervisor run the check every ``health_every`` seconds while it is RUNNING,
each run bounded by ``health_timeout`` (passive). ``"ok"`` is healthy; anything else
(``"degraded"``, ``"unhealthy"``, ...) is not. Each change is one ``health`` event in
the timeline and one log line, and other services can read or wait for it.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ._events import EventHub
from ._exceptions import ConfigurationError
from ._validate import is_async_function, require_seconds

logger = logging.getLogger("nursery_down")

#: The one healthy value.
HEALTHY = "ok"
#: What a failing or timing-out check sets.
UNHEALTHY = "unhealthy"
#: Longest reason kept (a check's error message can be long).
REASON_LIMIT = 300

#: ``async def check() -> str | None`` (or taking the ServiceContext): returning None
#: or ``"ok"`` means healthy, another string is that health, raising means unhealthy.
HealthCheck = Callable[..., Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Health:
    """A service's health at one instant."""

    #: ``"ok"``, or what is wrong (``"degraded"``, ``"unhealthy"``...).
    value: str = HEALTHY
    #: Why, when not ok (a check's error, a timeout, what the service said).
    reason: str | None = None

    @property
    def healthy(self) -> bool:
        return self.value == HEALTHY


class HealthBoard:
    """Every service's health, one owner: set, read and waited on here."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._health: dict[str, Health] = {}
        self._changed = trio.Event()

    def get(self, service: str) -> Health:
        """The health of *service* (``ok`` until something says otherwise)."""
        return self._health.get(service, Health())

    def set(self, service: str, value: str, reason: str | None = None, *, by: str) -> None:
        """Record the health of *service* (*by*: what found it); publish any change."""
        value = _clean(str(value)) or HEALTHY
        reason = None if value == HEALTHY or reason is None else _clean(str(reason))
        new = Health(value, reason)
        old = self.get(service)
        if new == old:
            return
        self._health[service] = new
        message = f"health {old.value} -> {value}" + (f": {reason}" if reason else "")
        self._hub.publish(
            "health",
            message,
            service=service,
            state=value,
            previous=old.value,
            detail={"reason": reason, "by": by},
        )
        log = logger.info if new.healthy else logger.warning
        log("service %s: %s (%s)", service, message, by)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, service: str, *, healthy: bool) -> Health:
        """Wait until *service* is healthy (or, with ``healthy=False``, until it is not)."""
        while self.get(service).healthy is not healthy:
            await self._changed.wait()
        return self.get(service)


def check_takes_context(check: HealthCheck) -> bool:
    """True when *check* takes one positional argument (the ServiceContext)."""
    try:
        parameters = inspect.signature(check).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 1


async def run_checks(
    board: HealthBoard,
    service: str,
    check: HealthCheck,
    context: Any,
    *,
    every: float,
    limit: float,
) -> None:
    """Run *check* now and then every *every* seconds until cancelled, recording what it
    finds. A check that raises, or takes longer than *limit* seconds, makes the service
    unhealthy with the reason; nothing a check does ends this loop."""
    takes_context = check_takes_context(check)
    while True:
        started = trio.current_time()
        value: str | None = None
        reason: str | None = None
        with trio.move_on_after(limit) as scope:
            try:
                result: object = await (check(context) if takes_context else check())
            except Exception as exc:
                value = UNHEALTHY
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if result is None or result == HEALTHY:
                    value = HEALTHY
                elif isinstance(result, str):
                    value, reason = result, "reported by its health check"
                else:
                    value, reason = (
                        UNHEALTHY,
                        f"its health check returned {type(result).__name__}, not a str or None",
                    )
        if scope.cancelled_caught:
            value, reason = UNHEALTHY, f"its health check took longer than {limit:g} s"
        assert value is not None
        board.set(service, value, reason, by="health check")
        await trio.sleep_until(started + every)


def _clean(text: str) -> str:
    """*text* on one line (it goes to logs and the timeline), cut to a sane length."""
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"


def require_health_options(
    service: str, check: object, every: float, timeout: float
) -> tuple[float, float]:
    """Validate a service's health options; (every, timeout) as floats."""
    if check is not None and (not callable(check) or not is_async_function(check)):
        raise ConfigurationError(
            f"service {service!r}: health must be an async function "
            "(async def check() -> str | None), got "
            f"{getattr(check, '__name__', type(check).__name__)!r}"
        )
    every = require_seconds(f"service {service!r}: health_every", every, positive=True)
    timeout = require_seconds(f"service {service!r}: health_timeout", timeout, positive=True)
    if not math.isfinite(every) or not math.isfinite(timeout):
        raise ConfigurationError(
            f"service {service!r}: health_every and health_timeout must be finite"
        )
    return every, timeout
