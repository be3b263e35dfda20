"""The transition table is the only place lifecycle rules live."""

from __future__ import annotations

import itertools

import pytest

import nursery_down as nd
from nursery_down._state import TRANSITIONS, ServiceState, check_transition


def test_every_pair_outside_the_table_is_refused() -> None:
    for current, target in itertools.product(ServiceState, repeat=2):
        if (current, target) in TRANSITIONS:
            check_transition("svc", current, target)
        else:
            with pytest.raises(nd.InvalidTransitionError, match=r"service 'svc' cannot go from"):
                check_transition("svc", current, target)


def test_every_state_can_be_left_and_reached() -> None:
    sources = {current for current, _ in TRANSITIONS}
    targets = {target for _, target in TRANSITIONS}
    assert sources == set(ServiceState)
    assert targets == set(ServiceState)


def test_state_values_are_the_snapshot_strings() -> None:
    assert [state.value for state in ServiceState] == [
        "starting",
        "running",
        "draining",
        "stopped",
        "backoff",
        "failed",
    ]
