"""SQLiteQueue at its edges: cancellation at every point, closing under load, other
trio runs, several objects and processes on one file, a worker pool through a drain,
pruning under a reader, odd payloads and rows, and exits in mid-transaction.

Real clock throughout, and no test waits for time to pass: where a test needs the
writer at a given point, it stops the writer there (a statement trace that waits on
an event) or holds the file's write lock, and it waits for what it can observe.
Every wait is bounded by a timeout only a hang reaches.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down.queues import (
    NotLeasedError,
    PayloadError,
    QueueCorruptError,
    QueuedJob,
    QueueError,
    QueueLockedError,
    SQLiteQueue,
)
from nursery_down.testing import check_history, read_history
from tests.queue_helpers import stats

T = TypeVar("T")

#: Bound on every wait: only a hang reaches it.
PATIENCE = 30.0
#: A poll interval no test outlasts: a claim that returns did not poll.
NEVER = 3600.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


class GatedQueue(SQLiteQueue):
    """An SQLiteQueue whose writer's statements are recorded, and whose writer can be
    stopped at its next ``BEGIN IMMEDIATE`` until the test lets it go on.

    Both happen in the writer thread; the test's task reads the record.
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.statements: list[str] = []
        self.gate = threading.Event()
        self.gate.set()  # open until close_gate()
        self.at_gate = threading.Event()

    def _open_sync(self) -> sqlite3.Connection:
        connection = super()._open_sync()
        connection.set_trace_callback(self._trace)
        return connection

    def _trace(self, statement: str) -> None:
        self.statements.append(statement)
        if statement == "BEGIN IMMEDIATE" and not self.gate.is_set():
            self.at_gate.set()
            self.gate.wait(PATIENCE)

    def close_gate(self) -> None:
        self.at_gate.clear()
        self.gate.clear()

    async def wait_at_gate(self) -> None:
        """Return once the writer stopped at the gate (inside its next transaction's
        BEGIN, before it took the lock)."""
        with trio.fail_after(PATIENCE):
            while not self.at_gate.is_set():
                await trio.sleep(0.001)

    def count(self, statement: str) -> int:
        return self.statements.count(statement)


class OldSQLiteQueue(SQLiteQueue):
    """An SQLiteQueue on an SQLite built with the old limit of 999 variables a
    statement (the default before SQLite 3.32; some distributions keep it)."""

    def _connect(self) -> sqlite3.Connection:
        connection = super()._connect()
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return connection


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Hold the file's write lock from a connection of the test's own."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def query(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(path)
    try:
        return list(connection.execute(sql, args))
    finally:
        connection.close()


def file_stats(path: Path) -> dict[str, int]:
    """Jobs by state, read from the file by a connection of the test's own."""
    counts = {"queued": 0, "leased": 0}
    counts.update(dict(query(path, "SELECT state, count(*) FROM jobs GROUP BY state")))
    return counts


def acks_by_job(path: Path) -> collections.Counter[int]:
    return collections.Counter(
        job for (job,) in query(path, "SELECT job_id FROM history WHERE event = 'ack'")
    )


def assert_history_whole(path: Path) -> None:
    report = check_history(read_history(sqlite=path))
    assert (report.lost, report.unexpected) == ((), ()), report.describe()


def writer_threads(path: Path) -> int:
    return sum(
        1 for thread in threading.enumerate() if thread.name == f"nursery_down writer {path.name}"
    )


async def claim(queue: SQLiteQueue) -> QueuedJob:
    with trio.fail_after(PATIENCE):
        job = await queue.claim()
    assert job is not None
    return job


async def in_another_run(function: Callable[[], Awaitable[T]]) -> T:
    """Run *function* in a trio.run of its own, in a thread; a hang fails the test."""
    with trio.fail_after(PATIENCE):
        return await trio.to_thread.run_sync(trio.run, function, abandon_on_cancel=True)


# -- cancellation at every point -----------------------------------------------------------


async def test_operations_cancelled_before_the_hand_over_do_nothing(db: Path) -> None:
    async with SQLiteQueue(db, poll_interval=NEVER) as queue:
        await queue.put("kept")
        for attempt in (
            lambda: queue.put("never"),
            lambda: queue.put_many(["never", "either"]),
            lambda: queue.claim(),
            lambda: queue.claim_many(10),
        ):
            with trio.CancelScope() as scope:
                scope.cancel()
                await attempt()
            assert scope.cancelled_caught
        assert await queue.statistics() == stats(queued=1)
        # Settling is never cut, not even before it began: the ack is done.
        job = await claim(queue)
        with trio.CancelScope() as scope:
            scope.cancel()
            await queue.ack(job)
        assert await queue.statistics() == stats(done=1)
    assert_history_whole(db)


async def test_operations_cancelled_after_the_hand_over_complete(db: Path) -> None:
    async with GatedQueue(db, poll_interval=NEVER) as queue:
        await queue.put_many(["ack me", "release me", "fail me", "claim me"])
        ack_me, release_me, fail_me = await queue.claim_many(3)
        results: dict[str, Any] = {}
        scopes: list[trio.CancelScope] = []

        async def run(name: str, operation: Callable[[], Awaitable[Any]]) -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                results[name] = await operation()

        queue.close_gate()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "put", lambda: queue.put("put"))
            await queue.wait_at_gate()  # the writer holds the put, in its transaction
            nursery.start_soon(run, "put_many", lambda: queue.put_many(["a", "b"]))
            nursery.start_soon(run, "claim_many", lambda: queue.claim_many(1))
            nursery.start_soon(run, "ack", lambda: queue.ack(ack_me))
            nursery.start_soon(run, "release", lambda: queue.release(release_me))
            nursery.start_soon(run, "fail", lambda: queue.fail(fail_me, "boom"))
            await trio.testing.wait_all_tasks_blocked()  # all handed over
            for scope in scopes:
                scope.cancel()
            queue.gate.set()
        assert results["put"] == 5
        assert results["put_many"] == [6, 7]
        assert len(results["claim_many"]) == 1
        # Six jobs queued then, one of them claimed; ack me done.
        assert await queue.statistics() == stats(queued=5, leased=1, done=1)
    assert_history_whole(db)


# -- closing while operations are in flight --------------------------------------------------


@pytest.mark.parametrize("opened", [True, False], ids=["opened", "first-use"])
@pytest.mark.parametrize("steps", [0, 1, 2, 5, -1], ids=lambda n: f"steps={n}")
async def test_closing_while_100_operations_are_in_flight(
    db: Path, opened: bool, steps: int
) -> None:
    """Each operation completes or finds the queue closed; the close waits for those
    handed over, leaves no lease behind, and the queue opens again.

    *steps*: scheduling steps the operations get before the close (-1: until every
    one of them waits); the queue may not be open yet when they start (first use).
    """
    before = writer_threads(db)
    if not opened:
        async with SQLiteQueue(db) as queue:
            await queue.put_many(range(30))
    queue = SQLiteQueue(db, poll_interval=NEVER)
    if opened:
        await queue.put_many(range(30))
    put_ids: list[int] = []
    acked: list[int] = []
    outcomes: collections.Counter[str] = collections.Counter()

    async def put(n: int) -> None:
        try:
            put_ids.extend(await queue.put_many([f"put {n}", f"more {n}"]))
            outcomes["put"] += 1
        except trio.ClosedResourceError:
            outcomes["put closed"] += 1

    async def claim_and_ack() -> None:
        try:
            job = await queue.claim()
        except trio.ClosedResourceError:
            outcomes["claim closed"] += 1
            return
        if job is None:
            outcomes["claim none"] += 1
            return
        try:
            await queue.ack(job)
        except trio.ClosedResourceError:
            outcomes["ack closed"] += 1  # the close released it
            return
        acked.append(job.id)
        outcomes["acked"] += 1

    async def read() -> None:
        try:
            await queue.statistics()
            outcomes["read"] += 1
        except trio.ClosedResourceError:
            outcomes["read closed"] += 1

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(put, n)
            for _ in range(50):  # more than are queued: some wait until the close
                nursery.start_soon(claim_and_ack)
            for _ in range(10):
                nursery.start_soon(read)
            if steps < 0:
                await trio.testing.wait_all_tasks_blocked()
            for _ in range(steps):
                await trio.lowlevel.checkpoint()
            await queue.aclose()
            # Closed, and stays closed whatever was in flight.
            assert queue.closed
            with pytest.raises(trio.ClosedResourceError):
                await queue.put("late")
            assert await queue.claim() is None
            assert file_stats(db)["leased"] == 0
    assert sum(outcomes.values()) == 100, outcomes
    assert queue.closed
    assert writer_threads(db) == before  # the writer ended with the close
    assert file_stats(db)["leased"] == 0
    done = acks_by_job(db)
    assert set(done) == set(acked)
    waiting = {job for (job,) in query(db, "SELECT id FROM jobs")}
    assert set(put_ids) <= waiting | set(done)  # every put that returned is stored
    async with queue:  # opens again
        left = await queue.statistics()
        assert left == stats(queued=30 + len(put_ids) - len(acked), done=len(acked))
    assert_history_whole(db)


async def test_two_closes_at_once_both_return_once_the_leases_are_released(db: Path) -> None:
    queue = SQLiteQueue(db)
    await queue.put_many(["a", "b"])
    await claim(queue)
    seen: list[dict[str, int]] = []

    async def close() -> None:
        await queue.aclose()
        seen.append(file_stats(db))

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close)
            nursery.start_soon(close)
    assert seen == [{"queued": 2, "leased": 0}] * 2


async def test_open_from_many_tasks_at_once_opens_once(db: Path) -> None:
    before = writer_threads(db)
    queue = SQLiteQueue(db)
    ids: list[int] = []

    async def first_use(n: int) -> None:
        ids.append(await queue.put(n))

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(queue.open)
            for n in range(30):
                nursery.start_soon(first_use, n)
    assert sorted(ids) == list(range(1, 31))
    assert writer_threads(db) == before + 1
    await queue.aclose()
    assert writer_threads(db) == before


async def test_operations_on_a_queue_whose_file_is_corrupt_then_on_a_good_one(db: Path) -> None:
    garbage = bytes(range(256)) * 64
    db.write_bytes(garbage)
    before = writer_threads(db)
    queue = SQLiteQueue(db)
    errors: list[BaseException] = []

    async def put() -> None:
        try:
            await queue.put("x")
        except QueueCorruptError as exc:
            errors.append(exc)

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(put)
        assert len(errors) == 10  # each use tried to open it, and said why it cannot
        with pytest.raises(QueueCorruptError, match="move it aside"):
            await queue.claim()
        with pytest.raises(QueueCorruptError):
            await queue.statistics()
    assert db.read_bytes() == garbage  # untouched
    assert writer_threads(db) == before  # no writer left behind
    db.unlink()
    assert await queue.put("x") == 1  # the file moved aside: the next use opens a new one
    assert (await claim(queue)).payload == "x"
    await queue.aclose()


async def test_a_close_that_cannot_release_its_leases_leaves_none_stuck(db: Path) -> None:
    """The close could not write (another process held the lock beyond the busy
    timeout): the leases it should have released are taken back later, by this object
    opening again or by any other of this process, never left leased for good."""
    queue = SQLiteQueue(db, busy_timeout=0.2)
    await queue.put_many(["a", "b", "c"])
    held = [await claim(queue), await claim(queue)]
    with write_lock_held(db), pytest.raises(QueueLockedError, match="busy_timeout"):
        await queue.aclose()
    assert queue.closed
    assert file_stats(db) == {"queued": 1, "leased": 2}
    async with SQLiteQueue(db) as other:  # another object of this process
        assert await other.statistics() == stats(queued=3)
    async with queue:
        with pytest.raises(NotLeasedError):
            await queue.ack(held[0])  # fenced off by the close
        assert await queue.statistics() == stats(queued=3)
    assert_history_whole(db)


# -- other trio runs ---------------------------------------------------------------------------


async def test_a_queue_left_open_by_a_trio_run_that_ended(db: Path) -> None:
    queue = SQLiteQueue(db)
    claimed: list[QueuedJob] = []

    async def first() -> None:
        await queue.put_many(["a", "b"])
        claimed.append(await claim(queue))  # and the run ends without closing it

    await in_another_run(first)
    assert file_stats(db) == {"queued": 1, "leased": 1}

    async def second() -> None:
        for use in (lambda: queue.put("c"), queue.statistics, queue.open):
            with pytest.raises(QueueError, match=r"ended without closing it.*aclose\(\)"):
                await use()
        await queue.aclose()  # releases what the first run held
        assert file_stats(db) == {"queued": 2, "leased": 0}
        with pytest.raises(trio.ClosedResourceError, match="open it again"):
            await queue.put("c")
        async with queue:
            await queue.put("c")
            job = await claim(queue)
            assert job.payload == "a"
            await queue.ack(job)

    await in_another_run(second)
    async with queue:  # closed properly in that run: this one opens it again
        assert await queue.statistics() == stats(queued=2, done=1)
        with pytest.raises(NotLeasedError):
            await queue.ack(claimed[0])
    assert_history_whole(db)


async def test_a_queue_open_in_another_running_trio_run_is_refused_not_hung(db: Path) -> None:
    queue = SQLiteQueue(db)
    opened = threading.Event()
    finish = threading.Event()

    async def owner() -> None:
        async with queue:
            await queue.put("a")
            opened.set()
            await trio.to_thread.run_sync(finish.wait, PATIENCE)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_another_run, owner)
        with trio.fail_after(PATIENCE):
            await trio.to_thread.run_sync(opened.wait, PATIENCE)
            with pytest.raises(QueueError, match=r"another trio\.run\(\), which is still running"):
                await queue.put("b")
            with pytest.raises(QueueError, match=r"another trio\.run\(\), which is still running"):
                await queue.aclose()
            refused_closed = queue.closed  # refused: nothing changed
            finish.set()
    assert not refused_closed
    assert queue.closed  # closed by its owner
    assert file_stats(db) == {"queued": 1, "leased": 0}


# -- several objects and processes on one file -------------------------------------------------


async def test_two_objects_in_one_process_hammering_one_file(db: Path) -> None:
    count = 600
    async with (
        SQLiteQueue(db, recover_interval=0.01) as first,
        SQLiteQueue(db, recover_interval=0.01) as second,
    ):
        queues = (first, second)
        remaining = count

        async def putter(queue: SQLiteQueue, start: int) -> None:
            for n in range(start, count, 4):
                await queue.put(n)
                await queue.put_many([])  # an empty batch is a transaction too

        async def worker(queue: SQLiteQueue) -> None:
            nonlocal remaining
            while remaining > 0:
                with trio.move_on_after(0.05):  # (only to look at remaining again)
                    jobs = await queue.claim_many(3)
                    for job in jobs:
                        remaining -= 1
                        await queue.ack(job)

        # (A QueueLockedError, or any other, fails the test from here.)
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(putter, queues[n % 2], n)
                for n in range(20):
                    nursery.start_soon(worker, queues[n % 2])
        assert await first.statistics() == stats(done=count)
    acks = acks_by_job(db)
    assert set(acks.values()) == {1}
    assert len(acks) == count
    assert query(db, "SELECT count(*) FROM history WHERE event = 'recover'") == [(0,)]
    assert_history_whole(db)


HAMMER = textwrap.dedent(
    """
    import os, sys, trio
    from nursery_down.queues import SQLiteQueue

    async def main():
        db, puts = sys.argv[1], int(sys.argv[2])
        options = dict(recover_interval=0.02, poll_interval=0.02)
        async with SQLiteQueue(db, **options) as a, SQLiteQueue(db, **options) as b:
            putting = trio.Event()

            async def putter(queue, start):
                for n in range(start, puts, 2):
                    if n % 10:
                        await queue.put([os.getpid(), n])
                    else:
                        await queue.put_many([[os.getpid(), n, "batch"]] * 3)

            async def worker(queue):
                while True:
                    jobs = []
                    with trio.move_on_after(0.1):
                        jobs = await queue.claim_many(4)
                    for job in jobs:
                        await queue.ack(job)
                    if not jobs and putting.is_set():
                        if (await queue.statistics()).queued == 0:
                            return

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(worker, (a, b)[n % 2])
                async with trio.open_nursery() as putters:
                    putters.start_soon(putter, a, 0)
                    putters.start_soon(putter, b, 1)
                putting.set()

    trio.run(main)
    """
)


async def test_two_processes_with_two_objects_each_hammering_one_file(db: Path) -> None:
    """Puts, batch claims and acks from four objects in two processes at once: each
    job acked exactly once, no lock error, no live lease taken back."""
    puts = 1500
    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(300))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, str(db), str(puts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    try:
        with trio.fail_after(PATIENCE * 2):
            for process in processes:
                output = await trio.to_thread.run_sync(process.communicate)
                assert process.returncode == 0, output[0].decode(errors="replace")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Each process put 1,500 payloads, every tenth as a batch of three.
    total = 300 + 2 * (puts + puts // 10 * 2)
    enqueued = {job for (job,) in query(db, "SELECT job_id FROM history WHERE event='enqueue'")}
    assert len(enqueued) == total
    acks = acks_by_job(db)
    assert set(acks) == enqueued
    assert set(acks.values()) == {1}
    assert file_stats(db) == {"queued": 0, "leased": 0}
    assert query(db, "SELECT value FROM counters WHERE name = 'done'") == [(total,)]
    assert query(db, "SELECT count(*) FROM history WHERE event = 'recover'") == [(0,)]
    assert_history_whole(db)


NAMESPACED_HOLDER = textwrap.dedent(
    """
    import os, sys, trio
    from nursery_down.queues import SQLiteQueue

    async def main():
        queue = SQLiteQueue(sys.argv[1])
        job = await queue.claim()
        print(os.getpid(), job.id, flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        os._exit(0)  # dead, holding its lease

    trio.run(main)
    """
)


def can_unshare() -> bool:
    try:
        subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            check=True,
            capture_output=True,
            timeout=PATIENCE,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not can_unshare(),
    reason="needs a PID namespace of its own (unshare --pid, as root)",
)
async def test_a_lease_held_from_another_pid_namespace_is_taken_back_only_once_it_died(
    db: Path,
) -> None:
    """Two containers of one host sharing the file: each sees the other's pids as
    nothing, or as another process."""
    async with SQLiteQueue(db) as queue:
        await queue.put_many(["a", "b"])
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    holder = subprocess.Popen(
        [*unshare, sys.executable, "-c", NAMESPACED_HOLDER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        with trio.fail_after(PATIENCE):
            line = await trio.to_thread.run_sync(holder.stdout.readline)
        pid, job_id = map(int, line.split())
        assert pid == 1  # its pid in its namespace: here, another process's
        async with SQLiteQueue(db) as queue:  # opening recovers dead processes' leases
            assert await queue.recover() == 0
            assert await queue.statistics() == stats(queued=1, leased=1)
            holder.stdin.close()  # it dies, its lease still held
            with trio.fail_after(PATIENCE):
                await trio.to_thread.run_sync(holder.wait)
            assert await queue.recover() == 1
            assert (await claim(queue)).id == job_id
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()
    assert query(db, "SELECT job_id, event FROM history WHERE event = 'recover'") == [
        (job_id, "recover")
    ]


def presence_locks(path: Path) -> int:
    """Descriptors of this process open on the queue file's presence lock file."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == f"{os.path.realpath(path)}-holders"
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_the_presence_lock_is_held_while_a_queue_of_the_process_is_open(
    db: Path,
) -> None:
    first, second = SQLiteQueue(db), SQLiteQueue(db)
    await first.open()
    await second.open()
    assert presence_locks(db) == 1  # one for the process
    await first.aclose()
    assert presence_locks(db) == 1  # the second still holds leases
    await second.aclose()
    assert presence_locks(db) == 0  # none kept for a file no queue has open
    async with second:
        assert presence_locks(db) == 1
    assert presence_locks(db) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_a_lease_token_keeps_the_form_earlier_versions_compare(db: Path) -> None:
    """A process of an earlier version sharing the file (the previous generation,
    during a deploy) tells a live lease by comparing its token whole with the one it
    makes of the holder's pid: the token keeps that form."""
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
        await claim(queue)
        [(pid, token)] = query(db, "SELECT lease_pid, lease_token FROM jobs")
    assert pid == os.getpid()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert token == f"linux:{boot}:{start}"


# -- a worker pool through a drain -------------------------------------------------------------


async def test_a_pool_of_50_workers_runs_5000_jobs_once_each_through_a_drain(db: Path) -> None:
    count = 5000
    handled: collections.Counter[int] = collections.Counter()
    total = 0
    part = trio.Event()
    everything = trio.Event()

    async def handler(job: QueuedJob) -> None:
        nonlocal total
        await trio.lowlevel.checkpoint()
        handled[job.id] += 1
        total += 1
        if total >= 2000:
            part.set()
        if total >= count:
            everything.set()

    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(count))
        sup = nd.Supervisor("app", grace=PATIENCE)
        sup.add(nd.worker_pool(queue, handler, workers=50), name="pool")
        with trio.fail_after(PATIENCE):
            async with nd.open_supervisor(sup):
                await part.wait()
                await sup.drain("pool")
                await sup.wait_state("pool", nd.ServiceState.STOPPED)
                figures = await queue.statistics()
        # Mid-run: what ran was acked, what was claimed and not started went back.
        assert figures.leased == 0
        assert figures.done == total < count
        assert figures.queued == count - total
        assert set(acks_by_job(db)) == set(handled)
        again = nd.Supervisor("app")
        again.add(nd.worker_pool(queue, handler, workers=50), name="pool")
        with trio.fail_after(PATIENCE):
            async with nd.open_supervisor(again):
                await everything.wait()
            assert await queue.statistics() == stats(done=count)
    assert sorted(handled) == list(range(1, count + 1))
    assert set(handled.values()) == {1}
    acks = acks_by_job(db)
    assert len(acks) == count
    assert set(acks.values()) == {1}
    report = check_history(read_history(sqlite=db))
    assert (report.lost, report.unexpected, report.duplicated) == ((), (), ())


# -- the history, pruned while a checker reads it ----------------------------------------------


async def test_pruning_never_leaves_part_of_a_jobs_history_for_a_reader(db: Path) -> None:
    """Rows of 7,500 jobs interleave (every enqueue, then every claim, then every
    ack): a pass that deleted rows up to a count, not whole jobs, would leave acks
    of jobs whose enqueue is gone. A checker reads all along."""
    count = 7500
    async with SQLiteQueue(db, max_attempts=1, keep_history=None, max_history=1) as queue:
        await queue.put_many(range(count))
        jobs = await queue.claim_many(count)
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(queue.ack, job)
        # Histories that must stay whole: a job queued, one leased and one dead.
        await queue.put_many(["queued", "leased", "dead"])
        waiting, leased, dead = await queue.claim_many(3)
        await queue.release(waiting)
        await queue.fail(dead, "boom")
        checked = 0
        pruning = True

        async def checker() -> None:
            nonlocal checked
            while pruning or not checked:
                history = await trio.to_thread.run_sync(read_history, None, db)
                report = check_history(history)
                assert (report.lost, report.unexpected) == ((), ()), report.describe()
                checked += 1

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(checker)
                passes = 0
                while await queue.prune_history():
                    passes += 1
                    assert_history_whole(db)  # after every pass
                pruning = False
        assert passes == 2  # 22,500 rows: more than one pass takes
        left = {job for (job,) in query(db, "SELECT DISTINCT job_id FROM history")}
        assert left == {waiting.id, leased.id, dead.id}  # every acked job went
        assert checked >= 1


# -- payloads and limits -----------------------------------------------------------------------


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


async def test_payloads_at_the_edges_round_trip_through_claim_many(db: Path) -> None:
    payloads: list[Any] = [
        "x" * 16_000_000,  # 16 MB
        nested(400),
        {"text": "héllo 🎉", "zero": "a\x00b", "big": 2**62, "float": 1e308},
        # Lone surrogates: what os.listdir() gives for a file name that is not UTF-8.
        "report-\udcff.csv",
        {"name\udce9": ["\ud800"]},
        [],
        None,
    ]
    async with SQLiteQueue(db) as queue:
        ids = await queue.put_many(payloads)
        jobs = await queue.claim_many(1_000_000)
        assert [job.id for job in jobs] == ids
        assert [job.payload for job in jobs] == payloads
        for job in jobs:
            await queue.ack(job)


@pytest.mark.parametrize(
    "payload",
    [float("nan"), {"x": float("inf")}, [-float("inf")], nested(100_000), {"a": {1, 2}}],
    ids=["nan", "inf", "-inf", "nested too deep", "set"],
)
async def test_payloads_json_cannot_hold_are_refused_with_payload_error(
    db: Path, payload: Any
) -> None:
    async with SQLiteQueue(db) as queue:
        with pytest.raises(PayloadError, match="cannot store a payload"):
            await queue.put(payload)
        with pytest.raises(PayloadError):
            await queue.put_many(["fine", payload])
        assert await queue.statistics() == stats()


class SmallSQLiteQueue(SQLiteQueue):
    """An SQLiteQueue whose SQLite stores at most 1 MB a value (1 GB by default)."""

    def _connect(self) -> sqlite3.Connection:
        connection = super()._connect()
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)
        return connection


async def test_a_payload_over_sqlites_length_limit_is_refused_and_only_it(db: Path) -> None:
    async with SmallSQLiteQueue(db) as queue:
        await queue.put("small")
        job = await claim(queue)
        errors: list[BaseException] = []

        async def put_big() -> None:
            try:
                await queue.put("x" * 2_000_000)
            except PayloadError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:  # handed to the writer together
            nursery.start_soon(put_big)
            nursery.start_soon(queue.ack, job)
            nursery.start_soon(queue.put, "fine")
        assert len(errors) == 1
        assert "keep large data elsewhere" in str(errors[0])
        assert await queue.statistics() == stats(queued=1, done=1)


async def test_claim_many_with_a_huge_limit(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(10))
        jobs = await queue.claim_many(1_000_000)
        assert [job.payload for job in jobs] == list(range(10))


async def test_claim_many_with_a_limit_beyond_sqlites_integers(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(range(3))
        assert [job.payload for job in await queue.claim_many(10**20)] == [0, 1, 2]


async def test_claiming_more_jobs_at_once_than_sqlite_takes_variables(db: Path) -> None:
    """One claim of 2,000 jobs, and one recovery of 2,000 leases of a dead process,
    on an SQLite that takes 999 variables a statement."""
    async with OldSQLiteQueue(db) as queue:
        await queue.put_many(range(2000))
        jobs = await queue.claim_many(1_000_000)
        assert [job.payload for job in jobs] == list(range(2000))
    # Released by the close; now a process that no longer runs holds all of them.
    connection = sqlite3.connect(db)
    with connection:
        connection.execute(
            "UPDATE jobs SET state = 'leased', lease_pid = ?, lease_token = ?,"
            " lease_owner = 'gone'",
            (os.getpid(), "linux:an-earlier-boot:12345"),
        )
    connection.close()
    async with OldSQLiteQueue(db, max_lost_leases=1) as queue:
        assert await queue.statistics() == stats(dead=2000)
        assert await queue.requeue_dead_letters() == 2000
        assert len(await queue.claim_many(5000)) == 2000


async def test_a_group_of_256_batch_claims_commits_once_and_shares_nothing(db: Path) -> None:
    async with GatedQueue(db, poll_interval=NEVER) as queue:
        await queue.put_many(range(257 * 50))
        batches: list[list[QueuedJob]] = []

        async def claim_50() -> None:
            batches.append(await queue.claim_many(50))

        commits = queue.count("COMMIT")
        queue.close_gate()
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(claim_50)
                await queue.wait_at_gate()
                for _ in range(256):
                    nursery.start_soon(claim_50)
                await trio.testing.wait_all_tasks_blocked()
                queue.gate.set()
        assert queue.count("COMMIT") - commits == 2  # the first, then 256 together
        assert [len(batch) for batch in batches] == [50] * 257
        ids = [job.id for batch in batches for job in batch]
        assert sorted(ids) == list(range(1, 257 * 50 + 1))


# -- rows changed by hand, errors the database cannot store ------------------------------------


async def test_a_payload_edited_into_invalid_json_is_dead_lettered_not_stuck(db: Path) -> None:
    """A row whose payload no longer decodes would fail every claim that reaches it,
    and hold up every job behind it: it goes to the dead letters, with its text."""
    async with SQLiteQueue(db, poll_interval=NEVER) as queue:
        await queue.put_many(["a", "b", "c", "d"])
        deep = "[" * 100_000 + "]" * 100_000
        with sqlite3.connect(db) as connection:
            connection.execute("UPDATE jobs SET payload = '{not json' WHERE id = 2")
            connection.execute("UPDATE jobs SET payload = ? WHERE id = 3", (deep,))
        connection.close()
        assert (await claim(queue)).payload == "a"
        assert (await claim(queue)).payload == "d"  # 2 and 3 went aside on the way
        assert await queue.statistics() == stats(leased=2, dead=2)
        dead = await queue.dead_letters()
        assert [(job.id, job.payload) for job in dead] == [(2, "{not json"), (3, deep)]
        assert all("not valid JSON" in job.error for job in dead)
        assert await queue.purge_dead_letters() == 2
    assert_history_whole(db)


async def test_an_error_message_no_utf8_can_hold_still_fails_the_job(db: Path) -> None:
    # A file name that is not UTF-8 reaches Python as lone surrogates, and so the
    # message of the error that names it.
    name = b"/data/\xff.csv".decode(errors="surrogateescape")
    async with SQLiteQueue(db, max_attempts=2) as queue:
        await queue.put("x")
        await queue.fail(await claim(queue), FileNotFoundError(2, "No such file", name))
        assert await queue.statistics() == stats(queued=1)
        await queue.fail(await claim(queue), f"cannot read {name}")
        assert await queue.statistics() == stats(dead=1)
        (dead,) = await queue.dead_letters()
        assert dead.error == "cannot read /data/\\udcff.csv"
    assert_history_whole(db)


async def test_an_error_whose_message_cannot_be_read_still_fails_the_job(db: Path) -> None:
    class UnreadableError(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message today")

    async with SQLiteQueue(db, max_attempts=1) as queue:
        await queue.put("x")
        await queue.fail(await claim(queue), UnreadableError())
        (dead,) = await queue.dead_letters()
        assert dead.error == (
            "UnreadableError (its message could not be read: RuntimeError('no message today'))"
        )
        assert await queue.statistics() == stats(dead=1)


async def test_a_group_that_cannot_get_the_write_lock_fails_at_once(db: Path) -> None:
    """31 puts wait for a lock another process holds: each hears of it after one
    busy timeout, not after one busy timeout per put waiting with it."""
    async with GatedQueue(db, busy_timeout=0.1) as queue:
        errors: list[BaseException] = []

        async def put(n: int) -> None:
            try:
                await queue.put(n)
            except QueueLockedError as exc:
                errors.append(exc)

        with write_lock_held(db):
            begins = queue.count("BEGIN IMMEDIATE")
            queue.close_gate()
            with trio.fail_after(PATIENCE):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(put, -1)
                    await queue.wait_at_gate()
                    for n in range(30):
                        nursery.start_soon(put, n)
                    await trio.testing.wait_all_tasks_blocked()
                    queue.gate.set()
        assert len(errors) == 31
        assert all("stayed locked" in str(error) for error in errors)
        # One try for the first put, one for the 30 that waited together.
        assert queue.count("BEGIN IMMEDIATE") - begins == 2
        assert await queue.put("after") == 1
        assert await queue.statistics() == stats(queued=1)


# -- a process that ends while its writer is inside a transaction ------------------------------

EXITER = textwrap.dedent(
    """
    import os, sys, threading, trio
    from nursery_down.queues import SQLiteQueue

    inside = threading.Event()  # the writer is in the middle of the big batch
    go_on = threading.Event()
    armed = False

    class Queue(SQLiteQueue):
        def _open_sync(self):
            connection = super()._open_sync()
            inserts = 0

            def trace(statement):
                nonlocal inserts
                if armed and statement.startswith("INSERT INTO jobs"):
                    inserts += 1
                    if inserts == 2000:
                        inside.set()
                        go_on.wait()

            connection.set_trace_callback(trace)
            return connection

    async def main():
        global armed
        queue = Queue(sys.argv[1])
        await queue.put_many(["before"] * 10)
        job = await queue.claim()
        armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.put_many, ["batch"] * 5000)
            await trio.to_thread.run_sync(inside.wait)
            if sys.argv[2] == "exit":
                os._exit(3)  # the process ends here, the batch half written
            # Cancelled once handed over, the batch still commits, and trio.run
            # returns only then.
            nursery.cancel_scope.cancel()
            go_on.set()
        print("returned", job.id, flush=True)

    trio.run(main)
    """
)


@pytest.mark.parametrize("mode", ["exit", "return"])
async def test_a_process_ending_with_its_writer_mid_transaction_leaves_the_file_whole(
    db: Path, mode: str
) -> None:
    with trio.fail_after(PATIENCE):
        result = await trio.run_process(
            [sys.executable, "-c", EXITER, str(db), mode], capture_stdout=True, check=False
        )
    if mode == "exit":
        assert result.returncode == 3
        batch = 0  # the half-written transaction is gone, all of it
    else:
        assert result.returncode == 0
        assert result.stdout == b"returned 1\n"
        batch = 5000  # handed over before the cancellation: it committed whole
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    # The claimed job's process is gone: opening takes its lease back.
    async with SQLiteQueue(db) as queue:
        assert await queue.statistics() == stats(queued=10 + batch)
    assert_history_whole(db)


# -- a settle that could not be written ----------------------------------------------------------


@pytest.mark.parametrize("action", ["ack", "release", "fail"])
async def test_a_job_whose_settle_could_not_be_written_is_claimed_again(
    db: Path, action: str
) -> None:
    async with SQLiteQueue(db, busy_timeout=0.05) as queue:
        await queue.put("work")
        job = await queue.claim()
        assert job is not None
        settles: dict[str, Callable[[], Awaitable[None]]] = {
            "ack": lambda: queue.ack(job),
            "release": lambda: queue.release(job),
            "fail": lambda: queue.fail(job, "boom"),
        }
        settle = settles[action]
        with write_lock_held(db), pytest.raises(QueueLockedError):
            await settle()
        with pytest.raises(NotLeasedError):  # no retry can race the claim below
            await settle()
        with trio.fail_after(PATIENCE):
            again = await queue.claim()  # not after the recovery interval: at once
        assert again is not None
        assert (again.id, again.payload, again.attempts) == (job.id, "work", 0)
        await queue.ack(again)
        assert await queue.statistics() == stats(done=1)
    events = query(db, "SELECT event, detail FROM history WHERE job_id = ? ORDER BY seq", job.id)
    assert events == [
        ("enqueue", None),
        ("claim", None),
        ("release", "its settle could not be written"),
        ("claim", None),
        ("ack", None),
    ]


async def test_a_recovery_that_could_not_be_written_is_tried_again(db: Path) -> None:
    async with SQLiteQueue(db, busy_timeout=0.05) as queue:
        await queue.put("work")
        job = await queue.claim()
        assert job is not None
        with write_lock_held(db), pytest.raises(QueueLockedError):
            await queue.ack(job)
        with sqlite3.connect(db) as connection:  # the next claim's recovery cannot commit
            connection.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON history WHEN NEW.event = 'release'"
                " BEGIN SELECT RAISE(ABORT, 'the disk refused the write'); END"
            )
        with pytest.raises(QueueError, match="the disk refused the write"):
            await queue.claim()
        with sqlite3.connect(db) as connection:
            connection.execute("DROP TRIGGER refuse")
        with trio.fail_after(PATIENCE):
            again = await queue.claim()  # its recovery is tried again, at once
        assert again is not None
        assert (again.id, again.payload) == (job.id, "work")
        await queue.ack(again)
        assert await queue.statistics() == stats(done=1)


async def test_a_pool_whose_ack_could_not_be_written_runs_the_job_again(db: Path) -> None:
    queue = SQLiteQueue(db, busy_timeout=0.05)
    runs: list[int] = []
    ran = [trio.Event(), trio.Event()]
    proceed = trio.Event()

    async def handle(job: QueuedJob) -> None:
        runs.append(job.id)
        ran[len(runs) - 1].set()
        await proceed.wait()

    sup = nd.Supervisor("stranded", max_restarts=1000)
    sup.add(nd.worker_pool(queue, handle, workers=2), name="pool")
    async with queue, nd.open_supervisor(sup):
        with sup.subscribe() as events, trio.fail_after(PATIENCE):
            await queue.put("work")
            await ran[0].wait()
            with write_lock_held(db):
                proceed.set()  # the job finishes; its ack finds the file locked
                async for event in events:
                    if event.kind == "state" and event.state == "backoff":
                        break  # the pool crashed on it
            await ran[1].wait()  # claimed again by the restarted pool
            await sup.drain()
            await sup.wait_finished()  # once its ack is written
        assert await queue.statistics() == stats(done=1)
    assert runs == [1, 1]
