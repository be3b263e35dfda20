"""SQLiteQueue on real files: operations, leases, orphans, dead letters, history, open errors.

Real clock throughout: the queue works in threads, which a mock clock would skip past.
So no test times the queue: a test that needs a claim to be waiting polls for it
(:class:`WatchedQueue`), and every wait is bounded by a timeout only a hang reaches.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nursery_down.queues import (
    JobSource,
    NotLeasedError,
    PayloadError,
    QueueCorruptError,
    QueuedJob,
    QueueLockedError,
    QueueUnwritableError,
    SQLiteQueue,
)
from tests.queue_helpers import stats


def history(path: Path) -> list[tuple[int, str]]:
    """(job id, event) of every history row, oldest first, read as a checker would."""
    with sqlite3.connect(path) as connection:
        return list(connection.execute("SELECT job_id, event FROM history ORDER BY seq"))


#: Bound on every wait: only a hang reaches it.
PATIENCE = 20.0
#: A poll interval no test outlasts: a claim that returns did not poll.
NEVER = 3600.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


async def claim(queue: SQLiteQueue) -> QueuedJob:
    with trio.fail_after(PATIENCE):
        job = await queue.claim()
    assert job is not None
    return job


class WatchedQueue(SQLiteQueue):
    """An SQLiteQueue that counts the looks of its claims that found nothing.

    After such a look the claim waits (for a put's wake-up, or the next poll): the
    event it waits on was taken before the look, so any put from then on is seen.
    """

    empty_looks = 0

    # Both run in the queue's writer thread; the test's task reads the count.

    def _has_queued(self, connection: sqlite3.Connection) -> bool:
        found = super()._has_queued(connection)
        if not found:
            self.empty_looks += 1
        return found

    def _claim_sync(
        self, connection: sqlite3.Connection, limit: int, recover: bool, orphans: tuple[int, ...]
    ) -> list[QueuedJob]:
        jobs = super()._claim_sync(connection, limit, recover, orphans)
        if not jobs:
            self.empty_looks += 1
        return jobs

    async def wait_claim_waiting(self) -> None:
        """Return once a claim looked and found nothing."""
        with trio.fail_after(PATIENCE):
            while not self.empty_looks:
                await trio.sleep(0.01)


# -- a process that holds a lease ------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import os, signal, sys, trio
    from nursery_down.queues import SQLiteQueue

    async def main():
        queue = SQLiteQueue(sys.argv[1])
        job = await queue.claim()
        print(job.id, flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        await trio.sleep_forever()

    trio.run(main)
    """
)


@pytest.fixture
def holder(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Start a process that claims one job from *db* and then waits, holding its lease."""
    processes: list[subprocess.Popen[str]] = []

    def start(mode: str) -> tuple[subprocess.Popen[str], int]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(db), mode], stdout=subprocess.PIPE, text=True
        )
        processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the lease holder exited before claiming"
        return process, int(line)

    yield start  # type: ignore[misc]
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# -- basic operations ---------------------------------------------------------------------


async def test_sqlite_queue_is_a_job_source(db: Path) -> None:
    assert isinstance(SQLiteQueue(db), JobSource)


async def test_put_claim_ack_with_statistics_and_history(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        assert await queue.put({"order": 17}) == 1
        assert await queue.put_many(["b", 3, [1, 2], None]) == [2, 3, 4, 5]
        assert await queue.statistics() == stats(queued=5)
        job = await claim(queue)
        assert job == QueuedJob(1, {"order": 17}, 0)
        assert await queue.statistics() == stats(queued=4, leased=1)
        await queue.ack(job)
        assert await queue.statistics() == stats(queued=4, done=1)
    assert history(db) == [
        *[(job_id, "enqueue") for job_id in range(1, 6)],
        (1, "claim"),
        (1, "ack"),
    ]


async def test_history_rows_carry_time_and_pid(db: Path) -> None:
    before = time.time()
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
    with sqlite3.connect(db) as connection:
        ((stamp, pid),) = connection.execute("SELECT time, pid FROM history")
    assert before <= stamp <= time.time()
    assert pid == os.getpid()


async def test_jobs_survive_closing_and_reopening(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(["a", "b"])
        await queue.ack(await claim(queue))
    async with SQLiteQueue(db) as queue:
        assert await queue.statistics() == stats(queued=1, done=1)
        assert await claim(queue) == QueuedJob(2, "b", 0)


async def test_ids_are_never_reused(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("a")
        await queue.ack(await claim(queue))
        assert await queue.put("b") == 2


async def test_payloads_round_trip_as_json(db: Path) -> None:
    payload = {"text": "héllo", "n": 1.5, "list": [1, None, True], "nested": {"a": []}}
    async with SQLiteQueue(db) as queue:
        await queue.put(payload)
        await queue.put((1, 2))
        assert (await claim(queue)).payload == payload
        assert (await claim(queue)).payload == [1, 2]


@pytest.mark.parametrize("payload", [object(), {"when": time}, float("nan"), {1j: 2}])
async def test_a_payload_that_is_not_json_raises_payload_error(db: Path, payload: object) -> None:
    async with SQLiteQueue(db) as queue:
        with pytest.raises(PayloadError, match="stores JSON") as caught:
            await queue.put(payload)
        assert isinstance(caught.value, TypeError)
        # All or none: one bad payload stores none of its batch.
        with pytest.raises(PayloadError):
            await queue.put_many(["fine", payload])
        assert await queue.statistics() == stats()


async def test_release_requeues_without_counting_an_attempt(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(["a", "b"])
        job = await claim(queue)
        await queue.release(job)
        assert await queue.statistics() == stats(queued=2)
        assert await claim(queue) == QueuedJob(1, "a", 0)
    assert (1, "release") in history(db)


async def test_fail_counts_attempts_then_dead_letters(db: Path) -> None:
    async with SQLiteQueue(db, max_attempts=3) as queue:
        await queue.put({"poison": True})
        for attempt in range(3):
            job = await claim(queue)
            assert job.attempts == attempt
            await queue.fail(job, ValueError(f"bad {attempt}"))
        assert await queue.statistics() == stats(dead=1)
        (dead,) = await queue.dead_letters()
        assert (dead.id, dead.payload, dead.attempts, dead.error) == (
            1,
            {"poison": True},
            3,
            "ValueError: bad 2",
        )
    events = [event for _, event in history(db)]
    assert events == ["enqueue", *["claim", "fail"] * 3, "dead"]
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT id, attempts FROM dead_letters").fetchall() == [(1, 3)]
        assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


async def test_dead_letters_are_requeued_with_attempts_reset_or_discarded(db: Path) -> None:
    async with SQLiteQueue(db, max_attempts=1) as queue:
        await queue.put_many([{"n": 1}, {"n": 2}, {"n": 3}])
        for _ in range(3):
            await queue.fail(await claim(queue), "bad")
        assert await queue.statistics() == stats(dead=3)
        assert await queue.requeue_dead_letters([2, 99]) == 1
        assert await queue.statistics() == stats(queued=1, dead=2)
        job = await claim(queue)
        assert (job.id, job.payload, job.attempts) == (2, {"n": 2}, 0)
        await queue.ack(job)
        assert await queue.purge_dead_letters([1]) == 1
        assert [d.id for d in await queue.dead_letters()] == [3]
        assert await queue.requeue_dead_letters() == 1
        assert await queue.purge_dead_letters() == 0
        assert await queue.statistics() == stats(queued=1, done=1)
    events = [event for job_id, event in history(db) if job_id == 2]
    assert events == ["enqueue", "claim", "fail", "dead", "enqueue", "claim", "ack"]


@pytest.mark.parametrize("action", ["ack", "release", "fail"])
async def test_settling_a_job_twice_raises_not_leased(db: Path, action: str) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
        job = await claim(queue)
        await queue.ack(job)

        async def fail_again(job: QueuedJob) -> None:
            await queue.fail(job, "again")

        settle = {"ack": queue.ack, "release": queue.release, "fail": fail_again}[action]
        with pytest.raises(NotLeasedError, match=f"cannot {action} job 1"):
            await settle(job)
        assert await queue.statistics() == stats(done=1)


async def test_a_lease_belongs_to_the_queue_object_that_claimed_it(db: Path) -> None:
    async with SQLiteQueue(db) as first, SQLiteQueue(db) as second:
        await first.put("x")
        job = await claim(first)
        with pytest.raises(NotLeasedError):
            await second.ack(job)
        # Same live process: the other object must not treat the lease as orphaned.
        assert await second.recover() == 0
        await first.ack(job)


# -- waiting and cancelling ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("poll_interval", "put_from"),
    [
        # A poll interval longer than any test: only the wake-up can end the wait.
        (NEVER, "the same object"),
        # A put through another object wakes nothing: the next poll finds the job.
        (0.05, "another object"),
    ],
)
async def test_a_waiting_claim_sees_a_put_at_once_or_within_the_poll_interval(
    db: Path, poll_interval: float, put_from: str
) -> None:
    queue = WatchedQueue(db, poll_interval=poll_interval)
    async with queue, SQLiteQueue(db) as other:
        putter = queue if put_from == "the same object" else other
        got: list[QueuedJob] = []

        async def claimer() -> None:
            got.append(await claim(queue))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claimer)
            await queue.wait_claim_waiting()
            await putter.put(f"from {put_from}")
        assert got == [QueuedJob(1, f"from {put_from}", 0)]
        if put_from == "the same object":
            assert queue.empty_looks == 1  # woken by the put: it looked again at once


async def test_cancelled_claim_claims_nothing(db: Path) -> None:
    async with SQLiteQueue(db, poll_interval=0.01) as queue:
        with trio.move_on_after(0.2):
            await queue.claim()
        await queue.put("x")
        for _ in range(20):  # cancel at many different instants of the claim
            with trio.move_on_after(0):
                await queue.claim()
        statistics = await queue.statistics()
        # A claim that had already started its thread delivers its job; none is lost.
        assert statistics.queued + statistics.leased == 1


async def test_closing_releases_leases_and_ends_claims(db: Path) -> None:
    queue = SQLiteQueue(db)
    await queue.put_many(["a", "b"])
    await claim(queue)
    await queue.aclose()
    assert queue.closed
    assert await queue.claim() is None
    with pytest.raises(trio.ClosedResourceError):
        await queue.put("c")
    await queue.aclose()  # idempotent
    async with SQLiteQueue(db) as again:
        assert await again.statistics() == stats(queued=2)
    assert history(db)[-1] == (1, "release")


async def test_a_handle_from_an_earlier_claim_cannot_settle_the_job_claimed_again(
    db: Path,
) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("a")
        first = await claim(queue)
        await queue.fail(first, "boom")  # back in the queue, claimed again below
        second = await claim(queue)
        assert (second.id, second.attempts) == (first.id, 1)
        for settle in (queue.ack, queue.release):
            with pytest.raises(NotLeasedError):
                await settle(first)
        await queue.aclose()
        await queue.open()
        third = await claim(queue)  # the same job, after a close and a reopen
        for stale in (first, second):
            with pytest.raises(NotLeasedError):
                await queue.ack(stale)
        await queue.ack(third)
        assert await queue.statistics() == stats(done=1)


async def test_a_closed_queue_opens_again_and_fences_its_old_leases(db: Path) -> None:
    # What a service that owns the queue does when it restarts.
    queue = SQLiteQueue(db)
    await queue.put_many(["a", "b"])
    before = await claim(queue)
    await queue.aclose()
    closed = []
    async with queue:
        closed.append(queue.closed)
        assert await queue.statistics() == stats(queued=2)
        with pytest.raises(NotLeasedError):
            await queue.ack(before)  # released by the close: someone else may run it
        again = await claim(queue)
        await queue.ack(again)
        assert await queue.statistics() == stats(queued=1, done=1)
    closed.append(queue.closed)
    assert closed == [False, True]
    with pytest.raises(trio.ClosedResourceError, match="open it again"):
        await queue.put("c")


async def test_close_wakes_a_waiting_claim(db: Path) -> None:
    queue = WatchedQueue(db, poll_interval=NEVER)  # only the close can end the wait
    results: list[QueuedJob | None] = []

    async def claimer() -> None:
        results.append(await queue.claim())

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(claimer)
            await queue.wait_claim_waiting()
            await queue.aclose()
    assert results == [None]
    assert queue.empty_looks == 1


# -- leases of other processes -----------------------------------------------------------------


async def test_lease_of_a_killed_process_is_requeued_at_open(db: Path, holder: object) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(["a", "b"])
    process, job_id = holder("kill")  # type: ignore[operator]
    assert process.wait(timeout=10) == -signal.SIGKILL
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone() == (
            "leased",
        )
    async with SQLiteQueue(db) as queue:
        assert await queue.statistics() == stats(queued=2)
        assert await claim(queue) == QueuedJob(1, "a", 0)  # no attempt counted
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT job_id, pid, detail FROM history WHERE event = 'recover'"
        ).fetchall()
    assert rows == [(job_id, os.getpid(), f"lease of pid {process.pid}, which no longer runs")]


async def test_lease_of_a_live_process_is_left_alone(db: Path, holder: object) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(["a", "b"])
    process, job_id = holder("hold")  # type: ignore[operator]
    async with SQLiteQueue(db) as queue:
        assert await queue.recover() == 0
        assert await queue.statistics() == stats(queued=1, leased=1)
        assert (await claim(queue)).id != job_id
        process.kill()
        process.wait(timeout=10)
        assert await queue.recover() == 1


async def test_orphans_are_found_while_claiming(db: Path, holder: object) -> None:
    async with SQLiteQueue(db, recover_interval=0.1, poll_interval=0.05) as queue:
        await queue.put("only")
        process, job_id = holder("hold")  # type: ignore[operator]
        assert await queue.statistics() == stats(leased=1)
        process.kill()
        process.wait(timeout=10)
        # Opened before the lease was taken: only a claim's own recovery can find it.
        assert (await claim(queue)).id == job_id
    assert (job_id, "recover") in history(db)


async def test_a_reused_pid_is_not_mistaken_for_the_lease_owner(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
    # A lease held by an earlier process that had our pid: same pid, other start token.
    with sqlite3.connect(db) as connection:
        connection.execute(
            "UPDATE jobs SET state = 'leased', lease_pid = ?, lease_token = ?,"
            " lease_owner = 'gone'",
            (os.getpid(), "linux:an-earlier-boot:12345"),
        )
    async with SQLiteQueue(db) as queue:
        assert await queue.statistics() == stats(queued=1)


async def test_a_zombie_does_not_hold_leases(db: Path, holder: object) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
    process, _ = holder("hold")  # type: ignore[operator]
    os.kill(process.pid, signal.SIGKILL)
    # Not reaped yet: the pid still exists, as a zombie.
    deadline = time.monotonic() + PATIENCE
    while Path(f"/proc/{process.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        await trio.sleep(0.01)
    async with SQLiteQueue(db) as queue:
        assert await queue.statistics() == stats(queued=1)


def lease_to_a_dead_process(path: Path) -> None:
    """Lease every queued job to a process that no longer runs (our pid, an earlier start)."""
    with sqlite3.connect(path) as connection:
        connection.execute(
            "UPDATE jobs SET state = 'leased', lease_pid = ?, lease_token = ?,"
            " lease_owner = 'gone' WHERE state = 'queued'",
            (os.getpid(), "linux:an-earlier-boot:12345"),
        )


async def test_a_job_whose_process_keeps_dying_is_dead_lettered_at_max_lost_leases(
    db: Path,
) -> None:
    async with SQLiteQueue(db, max_lost_leases=3) as queue:
        await queue.put("poison")
    for lost in range(1, 4):
        lease_to_a_dead_process(db)
        async with SQLiteQueue(db, max_lost_leases=3) as queue:
            expected = stats(queued=1) if lost < 3 else stats(dead=1)
            assert await queue.statistics() == expected
            dead = await queue.dead_letters()
    [poison] = dead
    assert (poison.id, poison.payload, poison.attempts) == (1, "poison", 0)
    assert poison.error == (
        f"its process died while running it, 3 times (the last was pid {os.getpid()})"
    )
    assert [event for _, event in history(db)] == [
        "enqueue",
        "recover",
        "recover",
        "recover",
        "dead",
    ]


async def test_without_max_lost_leases_a_job_comes_back_however_often_its_process_dies(
    db: Path,
) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
    for _ in range(10):
        lease_to_a_dead_process(db)
        async with SQLiteQueue(db) as queue:
            assert await queue.statistics() == stats(queued=1)


async def test_a_job_killing_its_process_is_dead_lettered_after_two_kills(
    db: Path, holder: object
) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("poison")
    for kill in (1, 2):
        process, job_id = holder("kill")  # type: ignore[operator]
        assert process.wait(timeout=10) == -signal.SIGKILL
        async with SQLiteQueue(db, max_lost_leases=2) as queue:
            expected = stats(queued=1) if kill == 1 else stats(dead=1)
            assert await queue.statistics() == expected
    [dead] = await SQLiteQueue(db).dead_letters()
    assert (dead.id, dead.payload) == (job_id, "poison")
    assert f"the last was pid {process.pid}" in dead.error


async def test_a_file_of_the_first_layout_is_upgraded_and_keeps_its_jobs(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put_many(["a", "b"])
        await queue.ack(await claim(queue))
    with sqlite3.connect(db) as connection:
        connection.execute("DROP INDEX history_by_job")
        connection.execute("ALTER TABLE jobs DROP COLUMN lost_leases")
        connection.execute("PRAGMA user_version=1")
    async with SQLiteQueue(db, max_lost_leases=1) as queue:
        assert await queue.statistics() == stats(queued=1, done=1)
        lease_to_a_dead_process(db)
        assert await queue.recover() == 1
        assert await queue.statistics() == stats(done=1, dead=1)
    assert_current_layout(db)


def assert_current_layout(db: Path) -> None:
    """The file is at today's layout version, with the index pruning needs."""
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (3,)
        indexes = connection.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")
        assert "history_by_job" in {name for (name,) in indexes}


async def test_a_file_of_the_second_layout_gains_the_history_index(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("a")
    with sqlite3.connect(db) as connection:
        connection.execute("DROP INDEX history_by_job")
        connection.execute("PRAGMA user_version=2")
    async with SQLiteQueue(db) as queue:
        assert await queue.statistics() == stats(queued=1)
    assert_current_layout(db)


async def test_a_file_of_a_newer_layout_is_refused(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA user_version=4")
    with pytest.raises(QueueCorruptError, match=r"layout version 4.*upgrade nursery_down"):
        await SQLiteQueue(db).open()


# -- errors at open ---------------------------------------------------------------------------


async def test_a_file_of_garbage_gives_a_corrupt_error_and_is_left_untouched(db: Path) -> None:
    garbage = bytes(range(256)) * 64
    db.write_bytes(garbage)
    with pytest.raises(
        QueueCorruptError, match=r"not a queue database or is damaged.*move it aside"
    ):
        await SQLiteQueue(db).open()
    assert db.read_bytes() == garbage


async def test_another_programs_database_is_not_used_as_a_queue(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE customers (name TEXT)")
    connection.close()
    with pytest.raises(QueueCorruptError, match="another program"):
        await SQLiteQueue(db).open()
    with sqlite3.connect(db) as connection:
        tables = connection.execute("SELECT name FROM sqlite_schema").fetchall()
    connection.close()
    assert tables == [("customers",)]


async def test_a_file_locked_beyond_the_busy_timeout_gives_a_locked_error(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("x")
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(QueueLockedError, match=r"locked by another process for 0.3 s.*fuser"):
            await SQLiteQueue(db, busy_timeout=0.3).open()
        assert time.monotonic() - started >= 0.3
    finally:
        other.close()
    async with SQLiteQueue(db) as queue:  # usable again once the lock is gone
        assert await queue.statistics() == stats(queued=1)


async def test_a_missing_folder_gives_an_unwritable_error(tmp_path: Path) -> None:
    with pytest.raises(QueueUnwritableError, match="does not exist; create it first"):
        await SQLiteQueue(tmp_path / "no-such-folder" / "jobs.db").open()


async def test_a_folder_path_gives_an_unwritable_error(tmp_path: Path) -> None:
    with pytest.raises(QueueUnwritableError, match="is a folder"):
        await SQLiteQueue(tmp_path).open()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
async def test_a_folder_where_no_file_can_be_created_gives_an_unwritable_error() -> None:
    # Even root cannot create a file in /proc.
    with pytest.raises(QueueUnwritableError, match=r"cannot write queue file.*may write"):
        await SQLiteQueue("/proc/self/jobs.db").open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files and folders")
async def test_a_read_only_folder_gives_an_unwritable_error(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(QueueUnwritableError, match="may write"):
            await SQLiteQueue(folder / "jobs.db").open()
    finally:
        folder.chmod(0o700)


async def test_operations_open_the_file_on_first_use(db: Path) -> None:
    queue = SQLiteQueue(db)
    assert not db.exists()
    await queue.put("x")
    assert db.exists()
    await queue.aclose()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_attempts", 0),
        ("max_lost_leases", 0),
        ("max_lost_leases", 2.5),
        ("busy_timeout", -1),
        ("poll_interval", float("inf")),
        ("synchronous", "OFF"),
    ],
)
def test_bad_options_are_configuration_errors(db: Path, option: str, value: object) -> None:
    from nursery_down import ConfigurationError

    with pytest.raises(ConfigurationError, match=option):
        SQLiteQueue(db, **{option: value})  # type: ignore[arg-type]


# -- defaults ---------------------------------------------------------------------------


async def test_by_default_a_job_is_dead_lettered_at_its_fifth_failed_attempt(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await queue.put("poison")
        for attempt in range(5):
            assert await queue.statistics() == stats(queued=1)
            job = await claim(queue)
            assert job.attempts == attempt
            await queue.fail(job, "bad")
        assert await queue.statistics() == stats(dead=1)
        assert (await queue.dead_letters())[0].attempts == 5


async def test_by_default_writes_are_synchronous_full(db: Path) -> None:
    def synchronous(connection: sqlite3.Connection) -> int:
        (level,) = connection.execute("PRAGMA synchronous").fetchone()
        return int(level)

    async with SQLiteQueue(db) as queue:
        with trio.fail_after(PATIENCE):
            assert await queue._write(synchronous) == 2  # FULL
    async with SQLiteQueue(db, synchronous="NORMAL") as queue:
        with trio.fail_after(PATIENCE):
            assert await queue._write(synchronous) == 1  # NORMAL


async def acked_jobs(queue: SQLiteQueue, count: int) -> None:
    for number in range(count):
        await queue.put(number)
        await queue.ack(await claim(queue))


async def test_by_default_the_history_of_a_finished_job_is_kept_seven_days(db: Path) -> None:
    week = 7 * 24 * 3600
    async with SQLiteQueue(db) as queue:
        await acked_jobs(queue, 2)
        with sqlite3.connect(db) as connection:
            # Job 1 ended a week and a minute ago, job 2 a minute short of a week ago.
            connection.execute(
                "UPDATE history SET time = ? WHERE job_id = 1", (time.time() - week - 60,)
            )
            connection.execute(
                "UPDATE history SET time = ? WHERE job_id = 2", (time.time() - week + 60,)
            )
        with trio.fail_after(PATIENCE):
            assert await queue.prune_history() == 3
    assert history(db) == [(2, "enqueue"), (2, "claim"), (2, "ack")]


async def test_by_default_the_history_keeps_the_last_million_rows(db: Path) -> None:
    async with SQLiteQueue(db) as queue:
        await acked_jobs(queue, 2)  # rows 1-3 are job 1's, rows 4-6 job 2's
        for last in (1_000_002, 1_000_003):
            with sqlite3.connect(db) as connection:
                # A later row numbered so that the million rows up to it start at row
                # last - 999,999: job 1's three rows fit in the million, then no longer.
                connection.execute(
                    "INSERT INTO history (seq, job_id, event, time, pid)"
                    " VALUES (?, 99, 'ack', ?, 1)",
                    (last, time.time()),
                )
            with trio.fail_after(PATIENCE):
                pruned = await queue.prune_history()
            assert pruned == (0 if last == 1_000_002 else 3)
    assert [event for job_id, event in history(db) if job_id == 1] == []
    assert [event for job_id, event in history(db) if job_id == 2] == ["enqueue", "claim", "ack"]
