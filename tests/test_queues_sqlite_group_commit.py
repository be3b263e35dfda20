"""SQLiteQueue's one writer: group commit, batch claims, failing commits, reads beside writes.

Grouping is made certain, not hoped for: the test holds the file's write lock from a
connection of its own, so the queue's writer waits in ``BEGIN IMMEDIATE`` with one
operation while the others queue up behind it; the writer's statements are traced,
so the test sees when it waits and how many transactions it committed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from nursery_down import ConfigurationError
from nursery_down.queues import (
    NotLeasedError,
    QueuedJob,
    QueueError,
    QueueUnwritableError,
    SQLiteQueue,
)
from nursery_down.testing import check_history, read_history
from tests.queue_helpers import stats

#: Bound on every wait: only a hang reaches it.
PATIENCE = 20.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


class TracedQueue(SQLiteQueue):
    """An SQLiteQueue whose writer's statements are recorded (in the writer thread)."""

    max_page_count: int | None = None

    def __init__(self, *args: object, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self.statements: list[str] = []

    def _open_sync(self) -> sqlite3.Connection:
        connection = super()._open_sync()
        connection.set_trace_callback(self.statements.append)
        if self.max_page_count is not None:
            # A full disk, for this connection: the file may not grow beyond this.
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            connection.execute(f"PRAGMA max_page_count = {pages + self.max_page_count}")
        return connection

    def commits(self) -> int:
        return self.statements.count("COMMIT")

    async def wait_for_statement(self, text: str, count: int = 1) -> None:
        with trio.fail_after(PATIENCE):
            while self.statements.count(text) < count:
                await trio.sleep(0.001)


@contextmanager
def write_lock_held(path: Path) -> Iterator[threading.Event]:
    """Hold the file's write lock from another connection until the event is set."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE")
    release = threading.Event()
    try:
        yield release
    finally:
        connection.execute("ROLLBACK")
        connection.close()


@asynccontextmanager
async def writer_held(queue: TracedQueue, db: Path) -> AsyncIterator[trio.Nursery]:
    """Make the writer wait for the write lock with one put, and yield a nursery: the
    operations started in it queue up behind that put. Then let the writer go, and
    wait for every operation to finish."""
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            with write_lock_held(db):
                begins = queue.statements.count("BEGIN IMMEDIATE")
                nursery.start_soon(queue.put, "first")
                await queue.wait_for_statement("BEGIN IMMEDIATE", begins + 1)
                yield nursery
                await trio.testing.wait_all_tasks_blocked()  # all handed to the writer


async def test_operations_waiting_together_commit_in_one_transaction(db: Path) -> None:
    async with TracedQueue(db, poll_interval=3600) as queue:
        await queue.put_many(range(20))
        jobs = await queue.claim_many(20)
        assert [job.payload for job in jobs] == list(range(20))
        before = queue.commits()
        async with writer_held(queue, db) as nursery:  # 20 acks and 30 puts wait together
            for job in jobs:
                nursery.start_soon(queue.ack, job)
            for n in range(30):
                nursery.start_soon(queue.put, n)
        # One commit for the first put, one for the 50 that waited together.
        assert queue.commits() - before == 2
        assert await queue.statistics() == stats(queued=31, done=20)


async def test_a_caller_resumes_only_once_its_transaction_committed(db: Path) -> None:
    async with TracedQueue(db) as queue:
        await queue.put("x")
        job = await queue.claim()
        assert job is not None
        acked = trio.Event()

        async def ack() -> None:
            await queue.ack(job)
            acked.set()

        async with writer_held(queue, db) as nursery:
            nursery.start_soon(ack)
            await trio.sleep(0.05)  # (a writer that answered early would have by now)
            assert not acked.is_set()
        assert acked.is_set()
        assert queue.statements[-1] == "COMMIT"
        assert await queue.statistics() == stats(queued=1, done=1)


async def test_a_refused_operation_leaves_its_group_to_commit(db: Path) -> None:
    async with TracedQueue(db) as queue:
        await queue.put_many(["a", "b", "c"])
        a, b, c = await queue.claim_many(3)
        await queue.ack(a)
        errors: list[BaseException] = []

        async def ack_again() -> None:
            try:
                await queue.ack(a)  # settled already: refused
            except NotLeasedError as exc:
                errors.append(exc)

        async with writer_held(queue, db) as nursery:
            nursery.start_soon(queue.ack, b)
            nursery.start_soon(ack_again)
            nursery.start_soon(queue.release, c)
        assert [type(error) for error in errors] == [NotLeasedError]
        assert await queue.statistics() == stats(queued=2, done=2)  # "first" and c


async def test_a_failing_commit_reaches_its_caller_and_loses_no_job(db: Path) -> None:
    async with TracedQueue(db) as queue:
        await queue.put_many(["a", "b", "c"])
        a, b, c = await queue.claim_many(3)
        # The database refuses to record the ack of b (as a full disk or a broken
        # file would refuse a write): the transaction holding it fails.
        with sqlite3.connect(db) as connection:
            connection.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON history"
                f" WHEN NEW.event = 'ack' AND NEW.job_id = {b.id}"
                " BEGIN SELECT RAISE(ABORT, 'the disk refused the write'); END"
            )
        errors: list[BaseException] = []

        async def ack(job: QueuedJob) -> None:
            try:
                await queue.ack(job)
            except QueueError as exc:
                errors.append(exc)

        async with writer_held(queue, db) as nursery:
            for job in (a, b, c):
                nursery.start_soon(ack, job)
        # b's caller got the error; a and c, in the same group, were done alone.
        assert len(errors) == 1
        assert "the disk refused the write" in str(errors[0])
        assert await queue.statistics() == stats(queued=1, leased=1, done=2)
        with sqlite3.connect(db) as connection:
            connection.execute("DROP TRIGGER refuse")
        with pytest.raises(NotLeasedError):  # its handle settles nothing more...
            await queue.ack(b)
        again = await queue.claim_many(2)  # ...and the next claim puts b back: not lost
        assert sorted(job.id for job in again) == sorted([b.id, c.id + 1])
        for job in again:
            await queue.ack(job)
        assert await queue.statistics() == stats(done=4)


async def test_a_full_disk_fails_the_put_that_needs_the_space_and_nothing_else(
    db: Path,
) -> None:
    queue = TracedQueue(db)
    queue.max_page_count = 2
    async with queue:
        await queue.put("small")
        job = await queue.claim()
        assert job is not None
        errors: list[BaseException] = []

        async def put_big() -> None:
            try:
                await queue.put("x" * 1_000_000)
            except QueueUnwritableError as exc:
                errors.append(exc)

        async with writer_held(queue, db) as nursery:
            nursery.start_soon(put_big)
            nursery.start_soon(queue.ack, job)
        assert len(errors) == 1
        assert "disk has space" in str(errors[0])
        assert await queue.statistics() == stats(queued=1, done=1)  # "first"; the ack


async def test_reads_do_not_wait_behind_writes(db: Path) -> None:
    async with TracedQueue(db) as queue:
        await queue.put("x")
        async with writer_held(queue, db):
            with trio.fail_after(2):  # well within the 5 s busy timeout
                assert await queue.statistics() == stats(queued=1)
                assert await queue.dead_letters() == []
        assert await queue.statistics() == stats(queued=2)


async def test_claim_many_leases_up_to_its_limit_oldest_first(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(5))
        first = await queue.claim_many(3)
        assert [job.payload for job in first] == [0, 1, 2]
        rest = await queue.claim_many(10)
        assert [job.payload for job in rest] == [3, 4]
        await queue.ack(first[1])
        await queue.release(rest[0])
        await queue.fail(first[0], "boom")
        assert await queue.statistics() == stats(queued=2, leased=2, done=1)
        for bad in (0, -1, 1.5, True, "3"):
            with pytest.raises(ConfigurationError, match="limit must be a whole number"):
                await queue.claim_many(bad)  # type: ignore[arg-type]
    assert await queue.claim_many(3) == []  # closed


async def test_an_idle_claim_takes_no_write_lock(db: Path) -> None:
    async with TracedQueue(db, poll_interval=0.01, recover_interval=3600) as queue:
        before = queue.statements.count("BEGIN IMMEDIATE")
        with trio.move_on_after(0.3):
            await queue.claim()
        # About 30 looks, none of them a write transaction.
        assert queue.statements.count("BEGIN IMMEDIATE") == before
        assert queue.statements.count("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1") > 3


async def test_a_claim_handed_to_the_writer_is_returned_even_when_cancelled(db: Path) -> None:
    async with TracedQueue(db) as queue:
        await queue.put("x")
        got: list[QueuedJob | None] = []
        claiming = trio.CancelScope()

        async def claim() -> None:
            with claiming:
                got.append(await queue.claim())

        async with writer_held(queue, db) as nursery:
            nursery.start_soon(claim)
            await trio.testing.wait_all_tasks_blocked()
            claiming.cancel()  # handed over already: the claim waits for its result
        # The job was claimed, so it was returned: never leased to nobody.
        assert [job.payload if job else None for job in got] == ["x"]
        assert not claiming.cancelled_caught
        assert await queue.statistics() == stats(queued=1, leased=1)


# -- a SIGKILL in the middle of a large group of acks -------------------------------------------

ACKER = textwrap.dedent(
    """
    import sys, trio, trio.testing
    from nursery_down.queues import SQLiteQueue

    async def main():
        queue = SQLiteQueue(sys.argv[1])
        jobs = await queue.claim_many(int(sys.argv[2]))
        first = int(sys.argv[3])  # acks of these come first and alone; 0: all at once

        async def ack(job):
            await queue.ack(job)
            print("acked", job.id, flush=True)

        if first:
            for job in jobs[:first]:
                await ack(job)
            print("go?", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            jobs = jobs[first:]
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(ack, job)
            await trio.testing.wait_all_tasks_blocked()
            print("all handed to the writer", flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


class Lines:
    """The lines of a child process's stdout, one at a time."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdout is not None
        self._stream = process.stdout
        self._buffer = b""

    async def next(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            assert chunk, "the acking process ended early"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


async def test_a_sigkill_while_many_acks_wait_to_commit_runs_again_exactly_those_jobs(
    db: Path,
) -> None:
    """300 acks return one by one; then 2,700 are handed to the writer at once while
    the test holds the write lock, and the process is killed with them waiting."""
    count, first = 3000, 300
    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(count))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", ACKER, str(db), str(count), str(first)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    lines = Lines(process)
    assert process.stdin is not None
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        with trio.fail_after(PATIENCE):
            while await lines.next() != b"go?":
                pass
            locker.execute("BEGIN IMMEDIATE")  # the acker's writer is idle: at once
            await process.stdin.send_all(b"go\n")
            assert await lines.next() == b"all handed to the writer"
            os.kill(process.pid, signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    async with SQLiteQueue(db) as queue:  # opening takes back the dead process's leases
        assert await queue.statistics() == stats(queued=count - first, done=first)
    acked, waiting = acked_and_waiting(db)
    assert acked == set(range(1, first + 1))
    assert waiting == set(range(first + 1, count + 1))
    report = check_history(read_history(sqlite=db))
    assert (report.lost, report.unexpected) == ((), ())


async def test_a_sigkill_in_the_middle_of_group_commits_loses_no_ack_that_returned(
    db: Path,
) -> None:
    """3,000 acks at once; the kill comes once 300 returned, wherever the writer is."""
    count = 3000
    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(count))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", ACKER, str(db), str(count), "0"], stdout=subprocess.PIPE
    )
    lines = Lines(process)
    returned: set[int] = set()
    with trio.fail_after(PATIENCE):
        while len(returned) < 300:
            line = await lines.next()
            if line.startswith(b"acked"):
                returned.add(int(line.split()[1]))
        os.kill(process.pid, signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    async with SQLiteQueue(db) as queue:
        figures = await queue.statistics()
    acked, waiting = acked_and_waiting(db)
    assert returned <= acked  # every ack that returned is on disk
    assert waiting == set(range(1, count + 1)) - acked  # exactly the others run again
    assert figures == stats(queued=count - len(acked), done=len(acked))
    report = check_history(read_history(sqlite=db))
    assert (report.lost, report.unexpected) == ((), ())


def acked_and_waiting(db: Path) -> tuple[set[int], set[int]]:
    """The ids acked according to the history, and the ids still in the queue."""
    with sqlite3.connect(db) as connection:
        acked = {
            job for (job,) in connection.execute("SELECT job_id FROM history WHERE event = 'ack'")
        }
        waiting = {job for (job,) in connection.execute("SELECT id FROM jobs")}
    return acked, waiting


# -- the history, kept bounded ------------------------------------------------------------------


def history_rows(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as connection:
        return list(connection.execute("SELECT job_id, event FROM history ORDER BY seq"))


async def run_jobs(queue: SQLiteQueue, count: int) -> None:
    """Put, claim and ack *count* jobs one after the other: three history rows each."""
    for n in range(count):
        await queue.put(n)
        job = await queue.claim()
        assert job is not None
        await queue.ack(job)


async def test_history_beyond_max_history_goes_oldest_first_whole_jobs_only(db: Path) -> None:
    async with SQLiteQueue(db, max_history=10, keep_history=None) as queue:
        await queue.put("held")  # job 1: leased all along, its rows must stay
        assert await queue.claim() is not None
        await run_jobs(queue, 10)  # jobs 2-11, 30 rows
        assert len(history_rows(db)) == 32
        # The last ten rows are those of jobs 9-11 and the last of job 8: jobs 2-7 go,
        # job 8 stays whole.
        assert await queue.prune_history() == 18
        rows = history_rows(db)
        assert rows[:2] == [(1, "enqueue"), (1, "claim")]
        assert {job for job, _ in rows} == {1, 8, 9, 10, 11}
        assert await queue.prune_history() == 0  # within the bound, but for whole jobs
    # What is left reads as complete histories.
    report = check_history(read_history(sqlite=db))
    assert (report.lost, report.unexpected) == ((), ())


async def test_history_older_than_keep_history_goes_but_never_of_queued_or_dead_jobs(
    db: Path,
) -> None:
    async with SQLiteQueue(db, max_attempts=1, keep_history=0.0, max_history=None) as queue:
        await run_jobs(queue, 5)
        await queue.put_many(["waiting", "poison", "leased"])
        waiting, poison, leased = await queue.claim_many(3)
        await queue.release(waiting)
        await queue.fail(poison, "boom")  # dead at its first failure
        assert await queue.prune_history() == 15  # the five acked jobs, all of their rows
        assert {job for job, _ in history_rows(db)} == {waiting.id, poison.id, leased.id}
        await queue.purge_dead_letters()
        await queue.ack(leased)
        assert await queue.prune_history() == 7  # the poison's 4 rows and the leased's 3
        assert {job for job, _ in history_rows(db)} == {waiting.id}


async def test_claiming_prunes_the_history_by_itself(db: Path) -> None:
    async with SQLiteQueue(db, max_history=30, recover_interval=0.01, poll_interval=0.01) as queue:
        await run_jobs(queue, 100)  # 300 rows, the claims recovering and pruning meanwhile
        with trio.fail_after(PATIENCE):
            while len(history_rows(db)) > 30:
                with trio.move_on_after(0.05):
                    await queue.claim()  # nothing queued: it looks, recovers, prunes
        assert history_rows(db)[-3:] == [(100, "enqueue"), (100, "claim"), (100, "ack")]


async def test_history_bounds_are_checked(db: Path) -> None:
    for options, message in (
        ({"max_history": 0}, "max_history must be a whole number >= 1, or None"),
        ({"max_history": 2.5}, "max_history must be a whole number"),
        ({"keep_history": -1}, "keep_history"),
        ({"keep_history": float("nan")}, "keep_history"),
    ):
        with pytest.raises(ConfigurationError, match=message):
            SQLiteQueue(db, **options)
