"""The lifecycle as data: the (state, trigger) table and the decision after a service's exit."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

import nursery_down as nd
from nursery_down._state import (
    ACTIVE_STATES,
    TRANSITIONS,
    ExitDecision,
    RestartPolicy,
    ServiceState,
    Trigger,
    after_exit,
    next_state,
)

S = ServiceState
T = Trigger


def test_every_pair_outside_the_table_is_refused() -> None:
    for current, trigger in itertools.product(ServiceState, Trigger):
        if (current, trigger) in TRANSITIONS:
            assert next_state("svc", current, trigger) is TRANSITIONS[current, trigger]
        else:
            with pytest.raises(nd.InvalidTransitionError, match=r"service 'svc' cannot"):
                next_state("svc", current, trigger)


def test_every_state_can_be_left_and_reached() -> None:
    assert {current for current, _ in TRANSITIONS} == set(ServiceState)
    assert set(TRANSITIONS.values()) == set(ServiceState)


def test_every_trigger_is_used() -> None:
    assert {trigger for _, trigger in TRANSITIONS} == set(Trigger)


def test_only_stopped_and_failed_services_can_be_started() -> None:
    startable = {state for state in ServiceState if (state, T.START) in TRANSITIONS}
    assert startable == {S.STOPPED, S.FAILED}
    assert startable.isdisjoint(ACTIVE_STATES)


def test_a_cancel_stops_every_active_state_and_nothing_else() -> None:
    cancellable = {state for state in ServiceState if (state, T.CANCEL) in TRANSITIONS}
    assert cancellable == ACTIVE_STATES
    assert {TRANSITIONS[state, T.CANCEL] for state in cancellable} == {S.STOPPED}


def test_state_values_are_the_snapshot_strings() -> None:
    assert [state.value for state in ServiceState] == [
        "starting",
        "running",
        "draining",
        "stopped",
        "backoff",
        "failed",
    ]


def _decide(
    policy: RestartPolicy,
    *,
    error: str | None = None,
    draining: bool = False,
    cut: bool = False,
    recent: int = 0,
    limit: int = 3,
) -> ExitDecision:
    return after_exit(
        policy=policy,
        error=error,
        draining=draining,
        cut=cut,
        recent_restarts=recent,
        max_restarts=limit,
        within=60.0,
    )


@pytest.mark.parametrize("policy", get_args(RestartPolicy))
@pytest.mark.parametrize("error", [None, "ValueError: boom"])
@pytest.mark.parametrize("draining", [False, True])
@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("recent", [0, 2, 3, 9])
def test_after_exit_decides_every_case(
    policy: RestartPolicy, error: str | None, draining: bool, cut: bool, recent: int
) -> None:
    decision = _decide(policy, error=error, draining=draining, cut=cut, recent=recent)
    if draining:
        # A drained service never restarts; a crash while draining is a failure.
        expected = T.STOP if error is None else T.FAIL
    elif policy == "temporary":
        expected = T.STOP if error is None else T.FAIL
    elif policy == "transient" and error is None:
        expected = T.STOP
    else:
        # Permanent, or transient after an error: restart within the budget.
        expected = T.RESTART if recent < 3 else T.FAIL
    assert decision.trigger is expected
    assert decision.reason
    if error is not None:
        assert error in decision.reason


def test_after_exit_says_when_the_deadline_cut_the_drain() -> None:
    assert _decide("permanent", draining=True).reason == "drained"
    assert _decide("permanent", draining=True, cut=True).reason == (
        "drained (grace deadline reached)"
    )


def test_after_exit_gives_up_with_the_count_and_window() -> None:
    decision = _decide("permanent", error="OSError: gone", recent=3)
    assert decision == ExitDecision(
        T.FAIL, "crashed: OSError: gone; 3 restarts within 60 s: giving up"
    )
