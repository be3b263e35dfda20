"""The exceptions nursery_down raises.

Every error a user can see derives from :class:`NurseryDownError`, so one
``except nd.NurseryDownError`` catches them all::

    NurseryDownError
    ├── ConfigurationError          bad arguments or service definitions (exit code 2)
    │   └── DependencyCycleError    ``after=`` dependencies that form a cycle
    ├── UnknownServiceError         a control call named a service that does not exist
    ├── InvalidTransitionError      an action that the service's current state does not allow
    └── DrainingError               a job was entered after its service began draining

Each message says what happened and what to do about it.
"""

from __future__ import annotations


class NurseryDownError(Exception):
    """Base class of every error raised by nursery_down."""


class ConfigurationError(NurseryDownError):
    """A supervisor, service or command was configured wrongly; the message says what to fix."""


class DependencyCycleError(ConfigurationError):
    """The ``after=`` dependencies of some services form a cycle, so no start order exists."""


class UnknownServiceError(NurseryDownError, LookupError):
    """A control method or route named a service that the supervisor does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        choices = ", ".join(repr(k) for k in known) or "none registered"
        super().__init__(f"unknown service {name!r}; known services: {choices}")


class InvalidTransitionError(NurseryDownError):
    """The requested action is not allowed from the service's current state."""


class DrainingError(NurseryDownError):
    """A job was entered after its service began draining.

    Take work through ``ctx.intake()``: it stops handing out items the moment a
    drain begins, so a job can never start late.
    """
