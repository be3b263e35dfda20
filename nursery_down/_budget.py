"""The grace budget: does a whole-app drain fit inside the deadline of whatever kills us?

A deploy tool waits a fixed time after SIGTERM before it sends SIGKILL: systemd's
``TimeoutStopSec=``, Kubernetes' ``terminationGracePeriodSeconds``. That is the
*outer deadline*. A whole-app drain needs, at worst::

    pre-drain delay + grace + stop margin

- the pre-drain delay: the app keeps serving while load balancers stop sending it
  traffic; the grace counts from its end;
- the grace: the whole app's grace deadline, which also caps every service's own grace;
- the stop margin: :data:`STOP_MARGIN_PER_SERVICE` seconds for each service, for what
  happens after its last job ended or was hard-cancelled (its function returning,
  jobs released back to their source, the next service in stop order beginning its
  drain, and finally the process exiting).

When that sum is larger than the outer deadline, jobs may be SIGKILLed in the middle
of a grace that promised to let them finish.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._validate import require_seconds

#: Seconds allowed for each service to stop once its jobs are over; see the module doc.
STOP_MARGIN_PER_SERVICE = 1.0


@dataclass(frozen=True, slots=True)
class GraceBudget:
    """The numbers of one budget check; all in seconds."""

    outer_deadline: float
    pre_drain: float
    grace: float
    services: int

    @property
    def margin(self) -> float:
        """The stop margin: :data:`STOP_MARGIN_PER_SERVICE` for each service."""
        return STOP_MARGIN_PER_SERVICE * self.services

    @property
    def needed(self) -> float:
        """The longest a whole-app drain may take: pre-drain delay + grace + stop margin."""
        return self.pre_drain + self.grace + self.margin

    @property
    def fits(self) -> bool:
        """True when the drain ends before the outer deadline."""
        return self.needed <= self.outer_deadline

    def describe(self) -> str:
        """The sum, spelled out: ``pre-drain 5 s + grace 30 s + stop margin 2 s ... = 37 s``."""
        parts = [f"grace {self.grace:g} s"]
        if self.pre_drain:
            parts.insert(0, f"pre-drain delay {self.pre_drain:g} s")
        each = "service" if self.services == 1 else "services"
        parts.append(
            f"stop margin {self.margin:g} s ({STOP_MARGIN_PER_SERVICE:g} s for each of "
            f"{self.services} {each})"
        )
        return f"{' + '.join(parts)} = {self.needed:g} s"

    def warning(self) -> str | None:
        """What to tell the operator when the drain does not fit, else None."""
        if self.fits:
            return None
        room = self.outer_deadline - self.pre_drain - self.margin
        if room > 0:
            shrink = f"lower the grace to at most {room:g} s"
        else:
            shrink = "shorten the pre-drain delay"
        return (
            f"grace budget: {self.describe()}, which does not fit inside the outer deadline "
            f"of {self.outer_deadline:g} s: jobs may be killed before their grace ends; "
            f"{shrink}, or raise the outer deadline (systemd TimeoutStopSec=, Kubernetes "
            f"terminationGracePeriodSeconds, and NURSERY_DOWN_OUTER_DEADLINE with it) "
            f"to at least {self.needed:g} s"
        )


def grace_budget(
    outer_deadline: float, *, grace: float, pre_drain: float = 0.0, services: int = 1
) -> GraceBudget:
    """Check that a drain of *services* with this *grace* and *pre_drain* fits *outer_deadline*."""
    return GraceBudget(
        outer_deadline=check_seconds("outer deadline", outer_deadline, positive=True),
        pre_drain=check_seconds("pre-drain delay", pre_drain),
        grace=check_seconds("grace", grace),
        services=services,
    )


def check_seconds(what: str, value: object, *, positive: bool = False) -> float:
    """*value* as float seconds; :class:`ConfigurationError` unless finite and >= 0 (> 0)."""
    return require_seconds(f"the {what}", value, positive=positive)
