"""How a service is defined: its function, restart policy, dependencies and limits."""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from ._exceptions import ConfigurationError, DependencyCycleError
from ._health import HealthCheck, require_health_options
from ._sources import require_sources
from ._state import RestartPolicy
from ._validate import is_async_function, require_seconds
from .queues._source import JobSource

if TYPE_CHECKING:
    from ._context import ServiceContext

ServiceFunction = Callable[["ServiceContext"], Awaitable[None]]

#: What a service may be called: it is one segment of the API's URLs
#: (``/api/services/<name>/drain``), an argument of the command line and a metrics
#: label, so nothing that a URL, a shell or a log line would read otherwise.
SERVICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", re.ASCII)
#: :data:`SERVICE_NAME` in words, for messages.
SERVICE_NAME_RULE = (
    "1 to 64 ASCII letters, digits, '_', '.' or '-', beginning with a letter, a digit or '_'"
)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter between restarts.

    The n-th restart within the intensity window waits
    ``min(maximum, initial * factor ** (n - 1))`` seconds, multiplied by a random
    factor in ``[1 - jitter, 1 + jitter]`` so that many crashing services do not
    restart in lockstep.
    """

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        require_seconds("Backoff.initial", self.initial)
        require_seconds("Backoff.factor", self.factor, minimum=1.0)
        require_seconds("Backoff.maximum", self.maximum, minimum=self.initial)
        require_seconds("Backoff.jitter", self.jitter)
        if self.jitter >= 1.0:
            raise ConfigurationError(f"Backoff.jitter must be below 1.0, got {self.jitter!r}")

    def delay(self, restart_number: int, rng: random.Random) -> float:
        """Seconds to wait before restart number *restart_number* (1-based)."""
        base = min(self.maximum, self.initial * self.factor ** (restart_number - 1))
        if self.jitter:
            base *= rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return base


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """Everything the supervisor knows about one service before it runs."""

    name: str
    function: ServiceFunction
    restart: RestartPolicy
    after: tuple[str, ...]
    grace: float | None
    max_restarts: int
    within: float
    backoff: Backoff
    #: A check the supervisor runs every *health_every* s while the service is RUNNING.
    health: HealthCheck | None = None
    health_every: float = 10.0
    health_timeout: float = 5.0
    #: False: the service's state and health do not count for the app's readiness.
    readiness: bool = True
    #: The job sources it uses (its worker pool's, and any given): watched and shown.
    sources: tuple[JobSource, ...] = ()


def make_spec(
    function: object,
    *,
    name: str | None,
    restart: str,
    after: Iterable[str],
    grace: float | None,
    max_restarts: int,
    within: float,
    backoff: Backoff | None,
    health: HealthCheck | None = None,
    health_every: float = 10.0,
    health_timeout: float = 5.0,
    readiness: bool = True,
    sources: Iterable[object] = (),
) -> ServiceSpec:
    """Validate a service definition and freeze it, with an error that says what to fix."""
    if not callable(function) or not is_async_function(function):
        raise ConfigurationError(
            f"service {getattr(function, '__name__', function)!r} must be an async function "
            "taking a ServiceContext (define it with 'async def')"
        )
    service_name = name if name is not None else getattr(function, "__name__", None)
    if not isinstance(service_name, str) or not service_name:
        raise ConfigurationError("a service needs a non-empty name: pass name='...'")
    if not SERVICE_NAME.fullmatch(service_name):
        shown = service_name if len(service_name) <= 80 else f"{service_name[:80]}..."
        raise ConfigurationError(
            f"bad service name {shown!r}: use {SERVICE_NAME_RULE} (e.g. name='db-primary'); "
            "the name appears in URLs, commands and metrics"
        )
    if restart not in get_args(RestartPolicy):
        raise ConfigurationError(
            f"service {service_name!r}: restart must be 'permanent', 'transient' or "
            f"'temporary', got {restart!r}"
        )
    if isinstance(after, str):
        after = [after]
    dependencies = tuple(after)
    if service_name in dependencies:
        raise ConfigurationError(f"service {service_name!r} cannot start after itself")
    if grace is not None:
        require_seconds(f"service {service_name!r}: grace", grace)
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigurationError(
            f"service {service_name!r}: max_restarts must be a whole number >= 0, "
            f"got {max_restarts!r}"
        )
    require_seconds(f"service {service_name!r}: within", within)
    health_every, health_timeout = require_health_options(
        service_name, health, health_every, health_timeout
    )
    if not isinstance(readiness, bool):
        raise ConfigurationError(
            f"service {service_name!r}: readiness must be True or False, got {readiness!r}"
        )
    return ServiceSpec(
        name=service_name,
        function=function,
        restart=restart,  # type: ignore[arg-type]  # checked above
        after=dependencies,
        grace=grace,
        max_restarts=max_restarts,
        within=within,
        backoff=backoff if backoff is not None else Backoff(),
        health=health,
        health_every=health_every,
        health_timeout=health_timeout,
        readiness=readiness,
        sources=require_sources(service_name, sources),
    )


def start_order(specs: list[ServiceSpec]) -> list[ServiceSpec]:
    """Registration order, moved only as far as ``after=`` requires (a stable topological sort).

    Raises :class:`ConfigurationError` for an unknown dependency and
    :class:`DependencyCycleError` for a cycle, naming the services involved.
    """
    by_name = {spec.name: spec for spec in specs}
    for spec in specs:
        for dependency in spec.after:
            if dependency not in by_name:
                raise ConfigurationError(
                    f"service {spec.name!r} starts after {dependency!r}, which is not a "
                    f"registered service; registered: {', '.join(by_name) or 'none'}"
                )
    ordered: list[ServiceSpec] = []
    placed: set[str] = set()
    visiting: list[str] = []

    def place(spec: ServiceSpec) -> None:
        if spec.name in placed:
            return
        if spec.name in visiting:
            cycle = [*visiting[visiting.index(spec.name) :], spec.name]
            raise DependencyCycleError(
                "services depend on each other in a cycle: "
                + " -> ".join(cycle)
                + "; remove one of these after= entries"
            )
        visiting.append(spec.name)
        for dependency in spec.after:
            place(by_name[dependency])
        visiting.pop()
        placed.add(spec.name)
        ordered.append(spec)

    for spec in specs:
        place(spec)
    return ordered
