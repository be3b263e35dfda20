"""Helpers shared by the job source and worker pool tests."""

from __future__ import annotations

from nursery_down.queues import QueueStatistics


def stats(queued: int = 0, leased: int = 0, done: int = 0, dead: int = 0) -> QueueStatistics:
    """Queue statistics with zero for every count not given."""
    return QueueStatistics(queued=queued, leased=leased, done=done, dead=dead)
