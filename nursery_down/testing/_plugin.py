"""The pytest plugin of nursery_down: the ``chaos`` fixture.

Installed through the ``pytest11`` entry point. It does nothing until a test asks
for the fixture: no hooks, no autouse fixtures, and the harness is imported only
then.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._harness import ChaosHarness

#: Set to replay a failing chaos test with the seed its report printed.
SEED_ENV = "NURSERY_DOWN_CHAOS_SEED"


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChaosHarness]:
    """A :class:`nursery_down.testing.ChaosHarness` in the test's own temporary folder.

    Start targets with ``chaos.start(...)``, signal them, then ``chaos.check()``.
    At teardown every target still running is stopped and its leftovers killed.
    Random instants come from ``chaos.rng``, seeded from ``$NURSERY_DOWN_CHAOS_SEED``
    if set, else at random; a failing test shows the seed to replay it.
    """
    from ._harness import ChaosHarness

    text = os.environ.get(SEED_ENV)
    seed = int(text) if text else None
    harness = ChaosHarness(tmp_path / "chaos", seed=seed)
    request.node.add_report_section(
        "setup", "chaos", f"seed {harness.seed} (replay: {SEED_ENV}={harness.seed})"
    )
    try:
        yield harness
    finally:
        harness.close()
