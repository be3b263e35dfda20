"""SQLiteQueue against a model: random programs of puts, claims, settles, groups of
concurrent operations, closes and reopens, each step checked against what a plain
in-memory model of the queue says.

A program is drawn by Hypothesis, then run in one ``trio.run`` on a fresh file. After
every step the queue's statistics equal the model's, every claim returned the oldest
queued jobs with their attempts, a settle is refused exactly when the model says the
job is not held (settled already, or claimed before a close), and the history read
as the chaos checker reads it loses nothing and shows nothing unexpected.

Every run tries the same programs (derandomized), so the test is deterministic; set
``ND_QUEUE_MODEL_HUNT=1`` to explore new ones.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from nursery_down.queues import NotLeasedError, QueuedJob, SQLiteQueue
from nursery_down.testing import check_history, read_history
from tests.queue_helpers import stats

MAX_ATTEMPTS = 2
SETTLES = ("ack", "release", "fail")

# A step is a tuple: ("put", n) | ("claim", limit) | ("settle", how, pick)
# | ("stale", how, pick) | ("together", [("put", n) | ("settle", how, pick), ...])
# | ("reopen",) | ("prune",). *pick* chooses among the jobs held (modulo their number).
settle = st.tuples(st.just("settle"), st.sampled_from(SETTLES), st.integers(0, 99))
put = st.tuples(st.just("put"), st.integers(1, 4))
step = st.one_of(
    put,
    st.tuples(st.just("claim"), st.integers(1, 5)),
    settle,
    st.tuples(st.just("stale"), st.sampled_from(SETTLES), st.integers(0, 99)),
    st.tuples(st.just("together"), st.lists(st.one_of(put, settle), min_size=2, max_size=8)),
    st.just(("reopen",)),
    st.just(("prune",)),
)


@dataclass
class Model:
    """What the queue should hold: ids queued (claimed lowest first), held, done, dead."""

    queued: dict[int, int] = field(default_factory=dict)  # id -> failed attempts
    held: dict[int, QueuedJob] = field(default_factory=dict)  # claimed through the queue
    stale: list[QueuedJob] = field(default_factory=list)  # claimed before a close
    next_id: int = 1
    done: int = 0
    dead: int = 0

    def put(self, count: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        self.queued.update(dict.fromkeys(ids, 0))
        return ids

    def settle(self, how: str, job: QueuedJob) -> None:
        del self.held[job.id]
        if how == "ack":
            self.done += 1
        elif how == "release":
            self.queued[job.id] = job.attempts
        elif job.attempts + 1 >= MAX_ATTEMPTS:
            self.dead += 1
        else:
            self.queued[job.id] = job.attempts + 1


def pick(jobs: list[QueuedJob], index: int) -> QueuedJob | None:
    return jobs[index % len(jobs)] if jobs else None


async def run_program(path: Path, program: list[Any]) -> int:
    """Run *program* on a queue at *path*, checking every step; return the steps run."""
    with trio.fail_after(60):  # only a hang reaches it
        async with SQLiteQueue(
            path, max_attempts=MAX_ATTEMPTS, synchronous="NORMAL", keep_history=0.0
        ) as queue:
            return await Runner(queue, path).run(program)


class Runner:
    def __init__(self, queue: SQLiteQueue, path: Path) -> None:
        self.queue = queue
        self.path = path
        self.model = Model()

    async def run(self, program: list[Any]) -> int:
        ran = 0
        for number, (kind, *args) in enumerate(program):
            where = f"step {number}: {kind} {args}"
            ran += await getattr(self, kind)(where, *args)
            figures = await self.queue.statistics()
            model = self.model
            assert figures == stats(
                queued=len(model.queued), leased=len(model.held), done=model.done, dead=model.dead
            ), where
            report = check_history(read_history(sqlite=self.path))
            assert (report.lost, report.unexpected) == ((), ()), f"{where}: {report.describe()}"
        return ran

    async def settle_one(self, how: str, job: QueuedJob) -> None:
        if how == "fail":
            await self.queue.fail(job, "boom")
        else:
            await getattr(self.queue, how)(job)

    async def put(self, where: str, count: int) -> int:
        ids = await self.queue.put_many(range(count))
        assert ids == self.model.put(count), where
        return 1

    async def claim(self, where: str, limit: int) -> int:
        queued = self.model.queued
        if not queued:
            return 0  # it would wait for work
        jobs = await self.queue.claim_many(limit)
        oldest = sorted(queued)[:limit]
        assert [job.id for job in jobs] == oldest, where
        assert [job.attempts for job in jobs] == [queued[i] for i in oldest], where
        for job in jobs:
            del queued[job.id]
            self.model.held[job.id] = job
        return 1

    async def settle(self, where: str, how: str, index: int) -> int:
        job = pick(list(self.model.held.values()), index)
        if job is None:
            return 0
        await self.settle_one(how, job)
        self.model.settle(how, job)
        return 1

    async def stale(self, where: str, how: str, index: int) -> int:
        job = pick(self.model.stale, index)
        if job is None:
            return 0
        with pytest.raises(NotLeasedError):  # claimed before a close: not held any more
            await self.settle_one(how, job)
        return 1

    async def together(self, where: str, parts: list[Any]) -> int:
        """Distinct held jobs settled and puts made all at once: one group for the writer."""
        chosen: dict[int, tuple[str, QueuedJob]] = {}
        puts: list[int] = []
        for part in parts:
            if part[0] == "put":
                puts.append(part[1])
            elif (job := pick(list(self.model.held.values()), part[2])) is not None:
                chosen.setdefault(job.id, (part[1], job))
        returned: list[int] = []

        async def put_some(count: int) -> None:
            returned.extend(await self.queue.put_many(range(count)))

        async with trio.open_nursery() as nursery:
            for how, job in chosen.values():
                nursery.start_soon(self.settle_one, how, job)
            for count in puts:
                nursery.start_soon(put_some, count)
        for how, job in chosen.values():
            self.model.settle(how, job)
        assert sorted(returned) == self.model.put(sum(puts)), where
        return 1

    async def reopen(self, where: str) -> int:
        await self.queue.aclose()  # releases what it held, attempts not counted
        model = self.model
        for job in model.held.values():
            model.queued[job.id] = job.attempts
        model.stale.extend(model.held.values())
        model.held.clear()
        await self.queue.open()
        return 1

    async def prune(self, where: str) -> int:
        await self.queue.prune_history()
        return 1


#: Steps run over all examples (a test that ran nothing would prove nothing).
steps_run: list[int] = []


@settings(
    max_examples=80,
    deadline=None,
    derandomize=not os.environ.get("ND_QUEUE_MODEL_HUNT"),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(step, min_size=8, max_size=40))
def test_sqlite_queue_agrees_with_its_model(program: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        steps_run.append(trio.run(run_program, Path(folder) / "jobs.db", program))


def test_the_model_programs_ran_steps() -> None:
    # (Runs after the test above in file order: the examples ran real steps.)
    assert sum(steps_run) > 400
