"""PostgresQueue against a real PostgreSQL server: operations, leases and fencing, the
sweeper, LISTEN wake-ups, dead letters, history, schema versions, connection errors, a
SIGKILLed worker process and a server restart in the middle of work.

Each test gets a database of its own on the session's server (nursery_down.testing.start_postgres).
Real clock throughout: the queue works in threads and on a real server. No test times
the queue except where the README promises a time (the orphans of a killed process);
waits poll what the database shows, bounded by a timeout only a hang reaches.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import trio

import nursery_down as nd
from nursery_down import ConfigurationError
from nursery_down.queues import (
    JobSource,
    NotLeasedError,
    PayloadError,
    PostgresQueue,
    QueuedJob,
    QueueSchemaError,
    QueueUnavailableError,
)
from nursery_down.testing import History, JobEvent, PostgresServer, check_history
from tests.queue_helpers import stats

T = TypeVar("T")

#: Bound on every wait: only a hang reaches it.
PATIENCE = 30.0
#: A poll interval no test outlasts: a claim that returns did not poll.
NEVER = 3600.0
#: The README's promise: a SIGKILLed worker's jobs run again elsewhere this soon.
ORPHAN_LIMIT = 5.0

PROGRAM = Path(__file__).resolve().parent / "programs" / "pg_worker.py"
CLI = Path(sys.executable).with_name("nursery-down")


@pytest.fixture
def dsn(postgres_dsn: str) -> str:
    return postgres_dsn


def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection, as an operator's psql would."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(query, args or None)
        return cursor.fetchall() if cursor.description else []


def events(dsn: str, name: str = "default") -> list[tuple[int, str]]:
    """(job id, event) of every history row, oldest first."""
    return [
        (int(job), str(event))
        for job, event in sql(dsn, f"SELECT job_id, event FROM ndq_{name}_history ORDER BY seq")
    ]


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll *check* until it returns something truthy; fail after PATIENCE seconds."""
    try:
        with trio.fail_after(PATIENCE):
            while True:
                value = await check()
                if value:
                    return value
                await trio.sleep(0.02)  # polling the database: nothing to wait on but time
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def claim(queue: PostgresQueue) -> QueuedJob:
    with trio.fail_after(PATIENCE):
        job = await queue.claim()
    assert job is not None
    return job


async def take_lease(dsn: str, job: QueuedJob, name: str = "default") -> None:
    """Make a job's lease expire now, as if its holder had stopped renewing it."""
    sql(
        dsn,
        f"UPDATE ndq_{name}_jobs SET lease_expires = now() - interval '1 second' WHERE id = %s",
        job.id,
    )


# -- operations ---------------------------------------------------------------------------


async def test_postgres_queue_is_a_job_source(dsn: str) -> None:
    assert isinstance(PostgresQueue(dsn), JobSource)


async def test_put_claim_ack_with_statistics_and_history(dsn: str) -> None:
    async with PostgresQueue(dsn) as queue:
        first = await queue.put({"order": 17})
        assert await queue.put_many(["a", "b"]) == [first + 1, first + 2]
        assert await queue.statistics() == stats(queued=3)
        job = await claim(queue)
        assert job == QueuedJob(first, {"order": 17}, 0)
        assert await queue.statistics() == stats(queued=2, leased=1)
        await queue.ack(job)
        assert await queue.statistics() == stats(queued=2, done=1)
        assert await queue.pending() == [first + 1, first + 2]
    assert events(dsn) == [
        (first, "enqueue"),
        (first + 1, "enqueue"),
        (first + 2, "enqueue"),
        (first, "claim"),
        (first, "ack"),
    ]
    # Acked jobs are deleted: done rows do not pile up.
    assert sql(dsn, "SELECT count(*) FROM ndq_default_jobs") == [(2,)]


async def test_history_rows_carry_database_time_and_pid(dsn: str) -> None:
    async with PostgresQueue(dsn) as queue:
        before = time.time()
        job_id = await queue.put(1)
        rows = await queue.history()
        assert rows == await queue.history(after=0)
        assert await queue.history(after=1) == []
    [(job, event, stamp, pid, detail)] = rows
    assert (job, event, pid, detail) == (job_id, "enqueue", os.getpid(), None)
    assert before - 5 < stamp < time.time() + 5  # the server's clock, on this machine


async def test_payloads_round_trip_as_json(dsn: str) -> None:
    payloads = [{"nested": [1, 2.5, None, True]}, "text é", 0, None, [], {"k": {}}]
    async with PostgresQueue(dsn) as queue:
        await queue.put_many(payloads)
        got = [(await claim(queue)).payload for _ in payloads]
    assert got == payloads


@pytest.mark.parametrize("payload", [object(), {1, 2}, float("nan"), b"bytes"])
async def test_a_payload_that_is_not_json_raises_payload_error_and_stores_nothing(
    dsn: str, payload: object
) -> None:
    async with PostgresQueue(dsn) as queue:
        with pytest.raises(PayloadError, match="stores JSON") as caught:
            await queue.put_many([1, payload])
        assert isinstance(caught.value, TypeError)
        assert await queue.statistics() == stats()
        assert await queue.put_many([]) == []


async def test_release_requeues_without_counting_an_attempt(dsn: str) -> None:
    async with PostgresQueue(dsn) as queue:
        job_id = await queue.put("x")
        await queue.release(await claim(queue))
        assert await queue.statistics() == stats(queued=1)
        again = await claim(queue)
        assert (again.id, again.attempts) == (job_id, 0)
        await queue.ack(again)
    assert [event for _, event in events(dsn)] == ["enqueue", "claim", "release", "claim", "ack"]


async def test_fail_counts_attempts_then_dead_letters(dsn: str) -> None:
    async with PostgresQueue(dsn, max_attempts=2) as queue:
        job_id = await queue.put({"poison": True})
        await queue.fail(await claim(queue), ValueError("bad input"))
        second = await claim(queue)
        assert second.attempts == 1
        await queue.fail(second, "still bad")
        assert await queue.statistics() == stats(dead=1)
        [dead] = await queue.dead_letters()
        assert (dead.id, dead.payload, dead.attempts, dead.error) == (
            job_id,
            {"poison": True},
            2,
            "still bad",
        )
        assert abs(dead.died_at - time.time()) < 60
    assert [event for _, event in events(dsn)] == [
        "enqueue",
        "claim",
        "fail",
        "claim",
        "fail",
        "dead",
    ]
    assert sql(dsn, "SELECT detail FROM ndq_default_history WHERE event = 'fail' ORDER BY seq") == [
        ("ValueError: bad input",),
        ("still bad",),
    ]


async def test_dead_letters_are_requeued_with_attempts_reset_or_purged(dsn: str) -> None:
    async with PostgresQueue(dsn, max_attempts=1) as queue:
        ids = await queue.put_many(["a", "b", "c"])
        for _ in ids:
            await queue.fail(await claim(queue), "no")
        assert [dead.id for dead in await queue.dead_letters()] == ids
        assert await queue.requeue_dead_letters([ids[0], 999_999]) == 1
        job = await claim(queue)
        assert (job.id, job.payload, job.attempts) == (ids[0], "a", 0)
        await queue.ack(job)
        assert await queue.purge_dead_letters([ids[1]]) == 1
        assert [dead.id for dead in await queue.dead_letters()] == [ids[2]]
        assert await queue.requeue_dead_letters() == 1
        assert await queue.statistics() == stats(queued=1, done=1)
        await queue.fail(await claim(queue), "no")
        assert await queue.purge_dead_letters() == 1
        assert await queue.statistics() == stats(done=1)


@pytest.mark.parametrize("action", ["ack", "release", "fail"])
async def test_settling_a_job_twice_raises_not_leased(dsn: str, action: str) -> None:
    async with PostgresQueue(dsn) as queue:
        await queue.put(1)
        job = await claim(queue)
        await queue.ack(job)

        async def settle_again() -> None:
            if action == "fail":
                await queue.fail(job, "late")
            else:
                await getattr(queue, action)(job)

        with pytest.raises(NotLeasedError, match=f"cannot {action} job {job.id}"):
            await settle_again()
        assert await queue.statistics() == stats(done=1)


async def test_a_lease_belongs_to_the_queue_object_that_claimed_it(dsn: str) -> None:
    async with PostgresQueue(dsn) as mine, PostgresQueue(dsn) as other:
        await mine.put(1)
        job = await claim(mine)
        with pytest.raises(NotLeasedError):
            await other.ack(job)
        await mine.ack(job)


async def test_two_queues_never_hand_out_the_same_job(dsn: str) -> None:
    taken: list[int] = []

    async def consume(queue: PostgresQueue, count: int) -> None:
        for _ in range(count):
            job = await claim(queue)
            taken.append(job.id)
            await queue.ack(job)

    async with PostgresQueue(dsn) as first, PostgresQueue(dsn) as second:
        ids = await first.put_many(range(60))
        async with trio.open_nursery() as nursery:
            for queue in (first, second, first, second):
                nursery.start_soon(consume, queue, 15)
        assert sorted(taken) == ids
        assert await first.statistics() == stats(done=60)


# -- claims in batches, grouped puts and settles ---------------------------------------


async def test_claim_many_leases_at_most_limit_jobs_each_with_a_token_of_its_own(
    dsn: str,
) -> None:
    async with PostgresQueue(dsn) as queue:
        ids = await queue.put_many(["a", "b", "c", "d", "e"])
        with trio.fail_after(PATIENCE):
            jobs = await queue.claim_many(3)
        assert [(job.id, job.payload, job.attempts) for job in jobs] == [
            (ids[0], "a", 0),
            (ids[1], "b", 0),
            (ids[2], "c", 0),
        ]
        assert await queue.statistics() == stats(queued=2, leased=3)
        tokens = sql(dsn, "SELECT lease_token FROM ndq_default_jobs WHERE state = 'leased'")
        assert len({token for (token,) in tokens}) == 3
        # Fewer ready than asked for: those that are, at once.
        with trio.fail_after(PATIENCE):
            rest = await queue.claim_many(10)
        assert [job.id for job in rest] == ids[3:]
        # Each lease is fenced on its own token: swapped tokens fence both acks...
        [(first,), (second,)] = sql(
            dsn,
            "SELECT lease_token FROM ndq_default_jobs WHERE id IN (%s, %s) ORDER BY id",
            ids[0],
            ids[1],
        )
        sql(dsn, "UPDATE ndq_default_jobs SET lease_token = %s WHERE id = %s", second, ids[0])
        sql(dsn, "UPDATE ndq_default_jobs SET lease_token = %s WHERE id = %s", first, ids[1])
        await queue.ack(jobs[0])
        await queue.ack(jobs[1])
        assert queue.lost_leases == 2
        # ... and leave the others of the same claim alone.
        for job in [jobs[2], *rest]:
            await queue.ack(job)
        assert await queue.statistics() == stats(leased=2, done=3)
    assert [job for job, event in events(dsn) if event == "ack"] == ids[2:]


async def test_claim_many_on_a_closed_queue_returns_no_jobs(dsn: str) -> None:
    queue = PostgresQueue(dsn)
    await queue.put_many([1, 2])
    await queue.aclose()
    with trio.fail_after(PATIENCE):
        assert await queue.claim_many(5) == []
    async with PostgresQueue(dsn) as reader:
        assert await reader.statistics() == stats(queued=2)


async def test_claim_many_wakes_on_a_put_and_returns_what_is_ready(dsn: str) -> None:
    async with PostgresQueue(dsn, poll_interval=NEVER) as queue:
        claimed: list[QueuedJob] = []

        async def waiting_claim() -> None:
            claimed.extend(await queue.claim_many(20))

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting_claim)
                await trio.testing.wait_all_tasks_blocked()
                job_id = await queue.put("wake up")
        assert [job.id for job in claimed] == [job_id]
        await queue.ack(claimed[0])


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3", None])
async def test_claim_many_refuses_a_limit_that_is_not_a_count(dsn: str, limit: Any) -> None:
    async with PostgresQueue(dsn) as queue:
        await queue.put(1)
        with pytest.raises(ConfigurationError, match="claim_many's limit must be a whole number"):
            await queue.claim_many(limit)
        assert await queue.statistics() == stats(queued=1)


def count_calls(queue: PostgresQueue, name: str) -> list[int]:
    """Record the size of each group that the thread function *name* of *queue* writes."""
    sizes: list[int] = []
    function = getattr(queue, name)

    def counted(connection: Any, items: list[Any]) -> Any:
        sizes.append(len(items))
        return function(connection, items)

    setattr(queue, name, counted)
    return sizes


async def test_concurrent_acks_commit_together_and_each_returns_once_committed(
    dsn: str,
) -> None:
    async with PostgresQueue(dsn) as queue:
        ids = await queue.put_many(range(50))
        with trio.fail_after(PATIENCE):
            jobs = await queue.claim_many(50)
        assert len(jobs) == 50
        groups = count_calls(queue, "_ack_sync")
        gone_when_returned: list[bool] = []

        async def ack(job: QueuedJob) -> None:
            await queue.ack(job)
            # Looked up at once, on a connection of its own: committed already.
            gone_when_returned.append(
                sql(dsn, "SELECT count(*) FROM ndq_default_jobs WHERE id = %s", job.id) == [(0,)]
            )

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(ack, job)
        assert gone_when_returned == [True] * 50
        assert sum(groups) == 50
        assert len(groups) <= 2  # the acks waiting at the same moment went together
    async with PostgresQueue(dsn) as other:
        assert await other.statistics() == stats(done=50)
        assert await other.pending() == []
    assert sorted(job for job, event in events(dsn) if event == "ack") == ids


async def test_a_lost_lease_in_a_group_of_acks_is_fenced_alone(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with PostgresQueue(dsn) as queue, PostgresQueue(dsn) as other:
        ids = await queue.put_many(range(5))
        with trio.fail_after(PATIENCE):
            jobs = await queue.claim_many(5)
        lost = jobs[2]
        await take_lease(dsn, lost)
        assert await other.sweep() == 1
        taken = await claim(other)
        assert taken.id == lost.id
        groups = count_calls(queue, "_ack_sync")
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(queue.ack, job)
        assert groups == [5]
        assert queue.lost_leases == 1
        assert f"ack of job {lost.id} changed nothing" in caplog.text
        assert await other.statistics() == stats(leased=1, done=4)
        await other.ack(taken)
    assert sorted(job for job, event in events(dsn) if event == "ack") == ids


async def test_concurrent_releases_go_together_and_are_fenced_each(dsn: str) -> None:
    async with PostgresQueue(dsn) as queue:
        ids = await queue.put_many(range(4))
        with trio.fail_after(PATIENCE):
            jobs = await queue.claim_many(4)
        # The first job's lease went elsewhere meanwhile.
        sql(
            dsn, "UPDATE ndq_default_jobs SET lease_token = gen_random_uuid() WHERE id = %s", ids[0]
        )
        groups = count_calls(queue, "_release_sync")
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(queue.release, job)
        assert groups == [4]
        assert queue.lost_leases == 1
        assert await queue.statistics() == stats(queued=3, leased=1)
    assert sorted(job for job, event in events(dsn) if event == "release") == ids[1:]


async def test_concurrent_puts_commit_together_and_each_gets_its_own_id(dsn: str) -> None:
    async with PostgresQueue(dsn) as queue:
        groups = count_calls(queue, "_put_sync")
        stored: dict[int, int] = {}

        async def put(n: int) -> None:
            stored[await queue.put({"n": n})] = n

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(put, n)
        assert sorted(stored.values()) == list(range(40))
        assert sum(groups) == 40
        assert len(groups) <= 2
        with trio.fail_after(PATIENCE):
            jobs = await queue.claim_many(40)
        assert {job.id: job.payload for job in jobs} == {
            job_id: {"n": n} for job_id, n in stored.items()
        }


async def test_a_put_cancelled_while_queued_stores_nothing_and_one_on_its_way_completes(
    dsn: str,
) -> None:
    async with PostgresQueue(dsn) as queue:
        await queue.statistics()  # opened
        entered = threading.Event()
        go_on = threading.Event()
        put_sync = queue._put_sync

        def held_back(connection: Any, texts: list[str]) -> list[int]:
            entered.set()
            go_on.wait(PATIENCE)
            return put_sync(connection, texts)

        queue._put_sync = held_back  # type: ignore[method-assign]
        first: list[int] = []

        async def first_put(scope: trio.CancelScope) -> None:
            with scope:
                first.append(await queue.put("on its way"))

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                first_scope = trio.CancelScope()
                nursery.start_soon(first_put, first_scope)
                await trio.to_thread.run_sync(entered.wait, PATIENCE)
                with trio.CancelScope() as queued:
                    nursery.start_soon(_cancel_when_blocked, queued)
                    await queue.put("queued behind it")
                assert queued.cancelled_caught
                first_scope.cancel()  # too late: its statement is on its way
                go_on.set()
        assert len(first) == 1
        assert await queue.statistics() == stats(queued=1)
        assert (await claim(queue)).payload == "on its way"


async def _cancel_when_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


# -- waiting for work -----------------------------------------------------------------


async def test_an_idle_claim_is_woken_by_a_put_from_another_process_object(dsn: str) -> None:
    async with (
        PostgresQueue(dsn, poll_interval=NEVER) as worker,
        PostgresQueue(dsn) as producer,
    ):
        # An empty queue: the first look finds nothing, then the claim listens.
        await worker.statistics()
        result: list[QueuedJob | None] = []

        async def wait_for_job() -> None:
            result.append(await worker.claim())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_job)
            await eventually(lambda: _listening(worker), "the worker to listen")
            await trio.testing.wait_all_tasks_blocked()
            job_id = await producer.put("wake up")
            # With an hour's poll interval, only the NOTIFY can have woken it.
            with trio.fail_after(PATIENCE):
                while not result:
                    await trio.sleep(0.005)
        [job] = result
        assert job is not None
        assert job.id == job_id
        await worker.ack(job)


async def _listening(queue: PostgresQueue) -> bool:
    await trio.lowlevel.checkpoint()
    return queue._listening


async def test_a_job_put_without_notify_is_found_by_polling(dsn: str) -> None:
    async with PostgresQueue(dsn, poll_interval=0.05) as queue:
        await queue.statistics()
        # Written behind the queue's back: no NOTIFY, as when the listener was down.
        sql(dsn, "INSERT INTO ndq_default_jobs (payload, state) VALUES ('42', 'queued')")
        job = await claim(queue)
        assert job.payload == 42
        await queue.ack(job)


async def test_cancelled_claim_claims_nothing(dsn: str) -> None:
    async with PostgresQueue(dsn, poll_interval=0.05) as queue:
        with trio.move_on_after(0.2):
            await queue.claim()
        await queue.put(1)
        assert await queue.statistics() == stats(queued=1)


async def test_closing_releases_leases_and_ends_claims(dsn: str) -> None:
    queue = PostgresQueue(dsn, poll_interval=NEVER)
    await queue.put_many([1, 2])
    job = await claim(queue)
    ended: list[QueuedJob | None] = []
    async with PostgresQueue(dsn) as reader:
        async with trio.open_nursery() as nursery:
            second_claimed = trio.Event()

            async def waiting_claim() -> None:
                await claim(queue)  # takes job 2
                second_claimed.set()
                ended.append(await queue.claim())

            nursery.start_soon(waiting_claim)
            # Not the database's leased count: it shows the claim committed while its
            # thread has yet to hand the job over, and a close then keeps it back.
            with trio.fail_after(PATIENCE):
                await second_claimed.wait()
            assert await reader.statistics() == stats(leased=2)
            await trio.testing.wait_all_tasks_blocked()
            await queue.aclose()
        assert ended == [None]
        assert queue.closed
        assert await queue.claim() is None
        assert await reader.statistics() == stats(queued=2)
        with pytest.raises(NotLeasedError):
            await queue.ack(job)
    assert [event for _, event in events(dsn)][-2:] == ["release", "release"]


async def test_a_closed_queue_opens_again(dsn: str) -> None:
    queue = PostgresQueue(dsn)
    await queue.put(1)
    await queue.aclose()
    with pytest.raises(trio.ClosedResourceError, match="open it again"):
        await queue.put(2)
    async with queue:
        assert not queue.closed
        await queue.ack(await claim(queue))
        assert await queue.statistics() == stats(done=1)


# -- leases, fencing, orphans ---------------------------------------------------------


async def test_a_late_ack_after_a_lost_lease_changes_nothing(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with PostgresQueue(dsn) as paused, PostgresQueue(dsn) as other:
        job_id = await paused.put("once")
        job = await claim(paused)
        await take_lease(dsn, job)  # as if the holder had been paused past its lease
        assert await other.sweep() == 1
        taken = await claim(other)
        assert taken.id == job_id
        # The paused holder wakes up and acks: fenced, so nothing changes.
        await paused.ack(job)
        assert paused.lost_leases == 1
        assert "lost its lease" in caplog.text
        assert await other.statistics() == stats(leased=1)
        assert sql(dsn, "SELECT lease_pid FROM ndq_default_jobs") == [(os.getpid(),)]
        # Release and fail of a lost lease are fenced the same way.
        await other.ack(taken)
        assert await other.statistics() == stats(done=1)
    history = events(dsn)
    assert history == [
        (job_id, "enqueue"),
        (job_id, "claim"),
        (job_id, "recover"),
        (job_id, "claim"),
        (job_id, "ack"),
    ]


@pytest.mark.parametrize("action", ["release", "fail"])
async def test_a_late_release_or_fail_after_a_lost_lease_changes_nothing(
    dsn: str, action: str
) -> None:
    async with PostgresQueue(dsn, max_attempts=1) as paused, PostgresQueue(dsn) as other:
        await paused.put("x")
        job = await claim(paused)
        await take_lease(dsn, job)
        await other.sweep()
        taken = await claim(other)
        if action == "release":
            await paused.release(job)
        else:
            await paused.fail(job, "late")
        assert await other.statistics() == stats(leased=1)
        assert await other.dead_letters() == []
        await other.ack(taken)


async def test_the_heartbeat_renews_leases_so_the_sweeper_leaves_them(dsn: str) -> None:
    async with (
        PostgresQueue(dsn, lease=0.6, heartbeat=0.1) as holder,
        PostgresQueue(dsn) as sweeper,
    ):
        await holder.put(1)
        job = await claim(holder)
        (leased_at,) = sql(dsn, "SELECT leased_at FROM ndq_default_jobs")[0]

        async def renewed_past_first_lease() -> bool:
            await trio.lowlevel.checkpoint()
            [(renewed, expires)] = sql(
                dsn, "SELECT renewed_at, lease_expires FROM ndq_default_jobs"
            )
            return bool((renewed - leased_at).total_seconds() > 1.2 and expires > renewed)

        await eventually(renewed_past_first_lease, "two lease lengths of renewals")
        assert await sweeper.sweep() == 0
        await holder.ack(job)
        assert holder.lost_leases == 0
        assert await holder.statistics() == stats(done=1)


async def test_the_heartbeat_notices_a_lost_lease(dsn: str) -> None:
    async with PostgresQueue(dsn, lease=3.0, heartbeat=0.05) as queue:
        await queue.put(1)
        job = await claim(queue)
        # Someone else's lease now: the sweeper gave the job to another holder.
        sql(dsn, "UPDATE ndq_default_jobs SET lease_token = gen_random_uuid()")

        async def lost() -> bool:
            await trio.lowlevel.checkpoint()
            return queue.lost_leases == 1

        await eventually(lost, "the heartbeat to find the lease gone")
        await queue.ack(job)  # fenced, no error
        assert await queue.statistics() == stats(leased=1)
        assert queue.lost_leases == 1


async def test_an_expired_lease_is_swept_back_without_counting_an_attempt(dsn: str) -> None:
    async with PostgresQueue(dsn) as queue:
        job_id = await queue.put(1)
        await take_lease(dsn, await claim(queue))
        assert await queue.sweep() == 1
        again = await claim(queue)
        assert (again.id, again.attempts) == (job_id, 0)
        await queue.ack(again)
    [(detail,)] = sql(dsn, "SELECT detail FROM ndq_default_history WHERE event = 'recover'")
    assert f"lease of pid {os.getpid()}" in detail
    assert "expired" in detail


async def test_a_job_whose_holders_keep_dying_is_dead_lettered_at_max_lost_leases(
    dsn: str,
) -> None:
    async with PostgresQueue(dsn, max_lost_leases=2) as queue:
        job_id = await queue.put("killer")
        for _ in range(2):
            await take_lease(dsn, await claim(queue))
            assert await queue.sweep() == 1
        [dead] = await queue.dead_letters()
        assert dead.id == job_id
        assert "died while running it, 2 times" in dead.error
        assert await queue.statistics() == stats(dead=1)
    assert [event for _, event in events(dsn)][-2:] == ["recover", "dead"]


async def test_the_sweeper_takes_back_the_jobs_of_a_holder_whose_session_ended(
    dsn: str,
) -> None:
    async with PostgresQueue(dsn, heartbeat=0.1) as queue:
        await queue.put(1)
        job = await claim(queue)
        # A holder whose lock nobody holds (its process died), silent for a while.
        sql(
            dsn,
            "UPDATE ndq_default_jobs SET lease_holder = 12345,"
            " renewed_at = now() - interval '10 seconds'",
        )
        queue._held.clear()  # this object no longer renews it
        assert await queue.sweep() == 1
        [(detail,)] = sql(dsn, "SELECT detail FROM ndq_default_history WHERE event = 'recover'")
        assert "holder is gone" in detail
        again = await claim(queue)
        assert again.id == job.id
        await queue.ack(again)


async def test_a_live_holder_keeps_its_jobs_however_long_they_run(dsn: str) -> None:
    async with PostgresQueue(dsn, heartbeat=0.1, lease=0.5) as holder:
        await holder.put(1)
        job = await claim(holder)
        # Not renewed for a while, but the holder's lock is held: not an orphan.
        sql(dsn, "UPDATE ndq_default_jobs SET renewed_at = now() - interval '10 seconds'")
        async with PostgresQueue(dsn) as sweeper:
            assert await sweeper.sweep() == 0
        await holder.ack(job)
        assert await holder.statistics() == stats(done=1)


async def test_one_process_of_the_fleet_sweeps_at_a_time(dsn: str) -> None:
    from nursery_down.queues._postgres import LOCK_SPACE, _Statements

    async with PostgresQueue(dsn) as queue:
        await queue.put(1)
        await take_lease(dsn, await claim(queue))
        with psycopg.connect(dsn, autocommit=True) as sweeping:
            # Another process sweeping right now holds the queue's sweep lock.
            key = _Statements("default").sweep_key
            sweeping.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_SPACE, key))
            assert await queue.sweep() == 0
            sweeping.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SPACE, key))
        assert await queue.sweep() == 1


async def test_done_rows_are_kept_for_keep_done_seconds_then_deleted(dsn: str) -> None:
    async with PostgresQueue(dsn, keep_done=0.3) as queue:
        await queue.put(1)
        await queue.ack(await claim(queue))
        assert sql(dsn, "SELECT state FROM ndq_default_jobs") == [("done",)]
        assert await queue.statistics() == stats(done=1)

        async def deleted() -> bool:
            await queue.sweep()
            return not sql(dsn, "SELECT 1 FROM ndq_default_jobs")

        await eventually(deleted, "the done row to be deleted")
        assert await queue.statistics() == stats(done=1)


async def test_history_is_kept_for_keep_history_seconds(dsn: str) -> None:
    async with PostgresQueue(dsn, keep_history=0.2) as queue:
        await queue.put(1)
        assert await queue.history()

        async def emptied() -> bool:
            await queue.sweep()
            return not await queue.history()

        await eventually(emptied, "the old history rows to be deleted")


async def test_the_history_passes_the_chaos_checker(dsn: str) -> None:
    async with PostgresQueue(dsn, max_attempts=1) as queue:
        ids = await queue.put_many(range(6))
        await queue.ack(await claim(queue))
        await queue.fail(await claim(queue), "poison")
        await queue.release(await claim(queue))
        await take_lease(dsn, await claim(queue))
        await queue.sweep()
        rows = await queue.history()
        pending = await queue.pending()
    report = check_history(
        History(events=tuple(JobEvent(*row) for row in rows), pending=frozenset(pending))
    )
    assert report.ok, report.describe()
    assert report.acked == {ids[0]}
    assert report.dead == {ids[1]}
    assert report.pending == set(ids[2:])


# -- a worker pool over it -----------------------------------------------------------------


async def test_a_worker_pool_runs_every_job_and_a_drain_leaves_none_leased(dsn: str) -> None:
    done: list[int] = []
    started = trio.Event()

    async def handle(job: QueuedJob) -> None:
        started.set()
        await trio.sleep(0.01)
        done.append(job.id)

    async with PostgresQueue(dsn) as queue:
        ids = await queue.put_many(range(40))
        sup = nd.Supervisor("pg")
        sup.add(nd.worker_pool(queue, handle, workers=5), name="pool")
        async with nd.open_supervisor(sup, fleet=False):
            await eventually(lambda: _count_done(queue, 20), "half the jobs")
            await sup.drain("pool")
        after_drain = await queue.statistics()
        assert after_drain.leased == 0
        assert after_drain.done == len(done)
        assert after_drain.queued == 40 - len(done)
        assert sorted(done + await queue.pending()) == ids
        assert sup.exit_code == nd.EXIT_OK


async def test_a_worker_pool_of_20_claims_in_batches_and_acks_every_job_once(dsn: str) -> None:
    ran: collections.Counter[int] = collections.Counter()
    all_ran = trio.Event()

    async def handle(job: QueuedJob) -> None:
        ran[job.id] += 1
        if len(ran) == 500:
            all_ran.set()

    async with PostgresQueue(dsn) as queue:
        ids = await queue.put_many(range(500))
        claims = count_claims(queue)
        sup = nd.Supervisor("pg-batches")
        sup.add(nd.worker_pool(queue, handle, workers=20), name="pool")
        async with nd.open_supervisor(sup, fleet=False):
            with trio.fail_after(PATIENCE):
                await all_ran.wait()
            await eventually(lambda: _count_done(queue, 500), "every ack to commit")
            await sup.drain()
        assert await queue.statistics() == stats(done=500)
        assert sup.exit_code == nd.EXIT_OK
    assert ran == dict.fromkeys(ids, 1)
    history = collections.Counter(events(dsn))
    assert history == {
        **{(job, "enqueue"): 1 for job in ids},
        **{(job, "claim"): 1 for job in ids},
        **{(job, "ack"): 1 for job in ids},
    }
    assert sum(claims) == 500
    assert max(claims) > 1  # idle workers were claimed for together


def count_claims(queue: PostgresQueue) -> list[int]:
    """Record how many jobs each claim statement of *queue* took."""
    sizes: list[int] = []
    claim_sync = queue._claim_sync

    def counted(connection: Any, limit: int) -> Any:
        leased = claim_sync(connection, limit)
        if leased:
            sizes.append(len(leased))
        return leased

    queue._claim_sync = counted  # type: ignore[method-assign]
    return sizes


async def test_a_worker_pool_cancels_a_job_whose_lease_was_lost(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def handle(job: QueuedJob) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with PostgresQueue(dsn, lease=3.0, heartbeat=0.05) as queue:
        await queue.put("long")
        sup = nd.Supervisor("pg-lost")
        sup.add(nd.worker_pool(queue, handle, workers=2), name="pool")
        async with nd.open_supervisor(sup, fleet=False):
            with trio.fail_after(PATIENCE):
                await started.wait()
            # Another process's sweeper took the lease back and gave the job to another.
            sql(dsn, "UPDATE ndq_default_jobs SET lease_token = gen_random_uuid()")
            with trio.fail_after(PATIENCE):
                await cancelled.wait()

            async def settled() -> bool:
                await trio.lowlevel.checkpoint()
                return "fail of job" in caplog.text

            await eventually(settled, "the pool to settle the cancelled job")
            (service,) = sup.snapshot()["services"]
            assert isinstance(service, dict)
            assert (service["failed"], service["in_flight"], service["state"]) == (
                1,
                0,
                "running",
            )
            await sup.drain()
        assert "its lease was lost" in caplog.text
        assert queue.lost_leases == 1
        # The fenced fail changed nothing: the job is still the other holder's.
        assert await queue.statistics() == stats(leased=1)
        assert [event for _, event in events(dsn)] == ["enqueue", "claim"]


async def test_watching_a_settled_job_does_nothing(dsn: str) -> None:
    calls: list[str] = []
    async with PostgresQueue(dsn) as queue:
        await queue.put(1)
        job = await claim(queue)
        await queue.ack(job)
        queue.watch_lease(job, lambda: calls.append("cancel"))
    assert calls == []


async def _count_done(queue: PostgresQueue, count: int) -> bool:
    return (await queue.statistics()).done >= count


# -- schema, configuration and connection errors ----------------------------------------


async def test_tables_of_a_newer_layout_are_refused(dsn: str) -> None:
    async with PostgresQueue(dsn, name="jobs") as queue:
        await queue.put(1)
    sql(dsn, "UPDATE ndq_jobs_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueSchemaError, match=r"layout version 99.*upgrade nursery_down"):
        await PostgresQueue(dsn, name="jobs").open()
    # Nothing was changed: the job is still there.
    assert sql(dsn, "SELECT count(*) FROM ndq_jobs_jobs") == [(1,)]


async def test_tables_not_written_by_a_queue_are_refused(dsn: str) -> None:
    sql(dsn, "CREATE TABLE ndq_other_meta (key text PRIMARY KEY, value text NOT NULL)")
    with pytest.raises(QueueSchemaError, match="give the queue another name"):
        await PostgresQueue(dsn, name="other").open()


async def test_queues_of_different_names_are_separate(dsn: str) -> None:
    async with PostgresQueue(dsn, name="a") as a, PostgresQueue(dsn, name="b") as b:
        await a.put("for a")
        assert await b.statistics() == stats()
        assert (await claim(a)).payload == "for a"


async def test_an_unreachable_server_gives_a_clear_error(dsn: str) -> None:
    with trio.fail_after(PATIENCE):
        queue = PostgresQueue(
            "host=127.0.0.1 port=1 dbname=nothing user=nobody password=secret",
            connect_timeout=2,
        )
        with pytest.raises(QueueUnavailableError) as caught:
            await queue.put(1)
    message = str(caught.value)
    assert "127.0.0.1:1/nothing" in message
    assert "check that the server runs" in message
    assert "secret" not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


async def test_a_missing_database_gives_a_clear_error(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn_for("no_such_database")
    with pytest.raises(QueueUnavailableError, match="no_such_database"):
        await PostgresQueue(dsn).open()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "Bad-Name"}, "name must be"),
        ({"name": ""}, "name must be"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_lost_leases": 0}, "max_lost_leases"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": 100}, "pool_size"),
        ({"lease": 1.0, "heartbeat": 0.5}, "a third of lease"),
        ({"poll_interval": -1}, "poll_interval"),
        ({"keep_done": float("nan")}, "keep_done"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(nd.ConfigurationError, match=match):
        PostgresQueue("host=127.0.0.1", **kwargs)


def test_without_psycopg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(nd.ConfigurationError, match=r"pip install 'nursery-down\[postgres\]'"):
        PostgresQueue("host=127.0.0.1")


def test_the_queues_package_imports_without_psycopg() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = sys.modules['psycopg_pool'] = None; "
        "import nursery_down.queues as q; print(q.PostgresQueue.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE, check=True
    )
    assert result.stdout.strip() == "PostgresQueue"


async def test_a_malformed_dsn_is_a_configuration_error() -> None:
    with pytest.raises(nd.ConfigurationError, match="invalid PostgreSQL DSN"):
        await PostgresQueue("this is = not a dsn =").open()
    with pytest.raises(nd.ConfigurationError, match="dsn must be"):
        PostgresQueue("  ")


# -- real processes, a real restart ---------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=PATIENCE)


@pytest.mark.subprocess
async def test_the_jobs_of_a_sigkilled_worker_run_again_elsewhere_within_5_s(
    dsn: str, ledger: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    async with PostgresQueue(dsn, name="jobs") as queue:
        ids = await queue.put_many([{"ms": 600_000}] * 3)
        output = tmp_path / "output"
        with open(output, "wb") as sink:
            worker = subprocess.Popen(
                [str(CLI), "run", f"{PROGRAM}:sup", "--no-dashboard"],
                env={**os.environ, "PG_WORKER_DSN": dsn, "PG_WORKER_LEDGER": str(ledger)},
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        processes.append(worker)

        async def all_started() -> bool:
            await trio.lowlevel.checkpoint()
            assert worker.poll() is None, output.read_text()
            lines = ledger.read_text().split("\n") if ledger.exists() else []
            return sum(line.startswith("start ") for line in lines) == len(ids)

        await eventually(all_started, "the worker to start every job")
        worker.send_signal(signal.SIGKILL)
        killed_at = time.time()
        assert worker.wait(timeout=PATIENCE) == -signal.SIGKILL
        # This process is the rest of the fleet: it takes the orphans as they come back.
        again = [await claim(queue) for _ in ids]
        rerun_after = time.time() - killed_at
        assert sorted(job.id for job in again) == ids
        assert rerun_after < ORPHAN_LIMIT, f"orphans ran again {rerun_after:.2f} s after the kill"
        for job in again:
            await queue.ack(job)
    details = sql(dsn, "SELECT detail FROM ndq_jobs_history WHERE event = 'recover'")
    assert len(details) == len(ids)
    assert all(f"pid {worker.pid}" in d and "holder is gone" in d for (d,) in details)


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_server_restart_in_the_middle_of_work_loses_nothing(
    dsn: str, postgres_server: PostgresServer, mode: str
) -> None:
    if not postgres_server.owned:
        pytest.skip("the server of $NURSERY_DOWN_TEST_POSTGRES is not ours to restart")
    acked: collections.Counter[int] = collections.Counter()
    restarted = trio.Event()

    async def handle(job: QueuedJob) -> None:
        await trio.sleep(0.005)
        acked[job.id] += 1

    async with PostgresQueue(dsn, heartbeat=0.2) as queue:
        ids = await queue.put_many(range(300))
        sup = nd.Supervisor("pg-restart")
        sup.add(nd.worker_pool(queue, handle, workers=8), name="pool")
        async with nd.open_supervisor(sup, fleet=False) as running:
            await eventually(lambda: _count_done(queue, 30), "some jobs done")
            [(started_before,)] = sql(dsn, "SELECT pg_postmaster_start_time()")
            await trio.to_thread.run_sync(postgres_server.restart, mode)
            [(started_after,)] = sql(dsn, "SELECT pg_postmaster_start_time()")
            assert started_after > started_before
            assert (await queue.statistics()).done < 300  # work was left for after it
            restarted.set()
            await eventually(lambda: _count_done(queue, 300), "every job done")
            assert sup.state_of("pool") is nd.ServiceState.RUNNING
            await running.drain()
        assert await queue.statistics() == stats(done=300)
        assert await queue.pending() == []
        lost = queue.lost_leases
    assert sorted(acked) == ids
    assert restarted.is_set()
    acks = collections.Counter(job for job, event in events(dsn) if event == "ack")
    assert set(acks) == set(ids)
    assert set(acks.values()) == {1}, "a job was acked twice"
    if mode == "fast":
        # A clean restart, shorter than the lease: every lease survived it, nothing ran twice.
        assert lost == 0
        assert set(acked.values()) == {1}
        assert sql(dsn, "SELECT count(*) FROM ndq_default_history WHERE event = 'recover'") == [
            (0,)
        ]
    else:
        # A crash may forget the last claims: those jobs ran again, their first acks fenced.
        assert sum(acked.values()) - len(ids) <= lost


@pytest.mark.subprocess
async def test_while_the_server_is_down_calls_raise_unavailable_then_work_again(
    dsn: str, postgres_server: PostgresServer
) -> None:
    if not postgres_server.owned:
        pytest.skip("the server of $NURSERY_DOWN_TEST_POSTGRES is not ours to stop")
    async with PostgresQueue(dsn, connect_timeout=1) as queue:
        await queue.put(1)
        await trio.to_thread.run_sync(postgres_server.stop)
        try:
            with pytest.raises(QueueUnavailableError, match="check that the server runs"):
                await queue.put(2)
            with pytest.raises(QueueUnavailableError, match=r"127\.0\.0\.1"):
                await queue.statistics()
        finally:
            await trio.to_thread.run_sync(postgres_server.start)

        async def answers() -> bool:
            try:
                await queue.statistics()
            except QueueUnavailableError:
                return False  # the pool is still waiting to try again
            return True

        # The pool reconnects by itself: the same queue object works again.
        await eventually(answers, "the queue to reach the server again")
        await queue.put(3)
        jobs = [await claim(queue), await claim(queue)]
        assert [job.payload for job in jobs] == [1, 3]
        for job in jobs:
            await queue.ack(job)
        assert await queue.statistics() == stats(done=2)


@pytest.mark.subprocess
async def test_claims_and_settles_wait_out_an_outage(
    dsn: str, postgres_server: PostgresServer
) -> None:
    if not postgres_server.owned:
        pytest.skip("the server of $NURSERY_DOWN_TEST_POSTGRES is not ours to stop")
    async with PostgresQueue(dsn, connect_timeout=1, heartbeat=0.2, poll_interval=0.2) as queue:
        await queue.put("first")
        job = await claim(queue)
        # A clean stop: a crash may forget the last claims (they commit asynchronously).
        await trio.to_thread.run_sync(postgres_server.stop, "fast")
        results: list[str] = []

        async def ack() -> None:
            await queue.ack(job)
            results.append("acked")

        async def claim_next() -> None:
            results.append((await claim(queue)).payload)

        async def met_the_outage() -> bool:
            await trio.lowlevel.checkpoint()
            return queue._unreachable

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ack)
                nursery.start_soon(claim_next)
                await eventually(met_the_outage, "the queue to meet the outage")
                await trio.to_thread.run_sync(postgres_server.start)
                async with PostgresQueue(dsn) as producer:
                    await producer.put("second")
        finally:
            if not postgres_server.dsn_reachable():
                await trio.to_thread.run_sync(postgres_server.start)
        assert sorted(results) == ["acked", "second"]
        assert await queue.statistics() == stats(leased=1, done=1)
        assert queue.lost_leases == 0


@pytest.mark.subprocess
async def test_a_settle_waits_for_a_server_that_is_away_no_longer_than_the_lease(
    dsn: str, postgres_server: PostgresServer
) -> None:
    if not postgres_server.owned:
        pytest.skip("the server of $NURSERY_DOWN_TEST_POSTGRES is not ours to stop")
    # A connect timeout far longer than the lease: the lease bounds the wait.
    async with PostgresQueue(dsn, connect_timeout=30, lease=1.5, heartbeat=0.25) as queue:
        await queue.put("kept")
        job = await claim(queue)
        await trio.to_thread.run_sync(postgres_server.stop, "fast")
        try:
            with trio.fail_after(PATIENCE):
                started = trio.current_time()
                await queue.ack(job)  # gives up: its lease lapses, the job runs again
                waited = trio.current_time() - started
        finally:
            await trio.to_thread.run_sync(postgres_server.start)
        assert waited <= 1.5 + 0.5, f"the ack waited {waited:.2f} s for a lease of 1.5 s"
        assert queue.lost_leases == 1
    async with PostgresQueue(dsn, lease=1.5, heartbeat=0.25) as queue:
        again = await claim(queue)  # once the lease lapsed, the sweeper put it back
        assert again.payload == "kept"
        await queue.ack(again)


@pytest.mark.subprocess
async def test_a_paused_worker_loses_its_leases_after_the_lease_and_its_late_acks_are_fenced(
    dsn: str, ledger: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    async with PostgresQueue(dsn, name="jobs") as queue:
        ids = await queue.put_many([{"ms": 300}] * 2)
        output = tmp_path / "output"
        with open(output, "wb") as sink:
            worker = subprocess.Popen(
                [str(CLI), "run", f"{PROGRAM}:sup", "--no-dashboard"],
                env={
                    **os.environ,
                    "PG_WORKER_DSN": dsn,
                    "PG_WORKER_LEDGER": str(ledger),
                    "PG_WORKER_LEASE": "1.5",
                    "PG_WORKER_HEARTBEAT": "0.3",
                },
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        processes.append(worker)

        def ledger_lines(kind: str) -> list[str]:
            lines = ledger.read_text().split("\n") if ledger.exists() else []
            return [line for line in lines if line.startswith(f"{kind} ")]

        async def all_started() -> bool:
            await trio.lowlevel.checkpoint()
            assert worker.poll() is None, output.read_text()
            return len(ledger_lines("start")) == len(ids)

        await eventually(all_started, "the worker to start every job")
        worker.send_signal(signal.SIGSTOP)  # paused: its connections stay open
        try:
            # Its lock stays held, so only the lease's expiry gives the jobs back.
            again = [await claim(queue) for _ in ids]
            assert sorted(job.id for job in again) == ids
        finally:
            worker.send_signal(signal.SIGCONT)

        # Resumed, each job either finishes (its ack is fenced) or is cancelled first by
        # the heartbeat that finds its lease lost (its fail is fenced).
        async def fenced() -> bool:
            await trio.lowlevel.checkpoint()
            return output.read_text().count("changed nothing") == len(ids)

        await eventually(fenced, "the worker to log its fenced acks")
        # Its late acks changed nothing: the jobs are ours, and its pool runs on.
        assert await queue.statistics() == stats(leased=len(ids))
        assert worker.poll() is None, output.read_text()
        for job in again:
            await queue.ack(job)
        assert await queue.statistics() == stats(done=len(ids))
    rows = sql(
        dsn, "SELECT event, pid, detail FROM ndq_jobs_history WHERE event IN ('ack', 'recover')"
    )
    assert sorted(event for event, _, _ in rows) == ["ack", "ack", "recover", "recover"]
    assert all(pid == os.getpid() for event, pid, _ in rows if event == "ack")
    assert all("expired" in detail for event, _, detail in rows if event == "recover")


# -- defaults ---------------------------------------------------------------------------


async def test_by_default_a_lease_lasts_30_s_and_the_heartbeat_renews_it_every_second(
    dsn: str,
) -> None:
    async with PostgresQueue(dsn) as queue:
        await queue.put(1)
        job = await claim(queue)
        [(length,)] = sql(
            dsn, "SELECT extract(epoch FROM lease_expires - leased_at) FROM ndq_default_jobs"
        )
        assert float(length) == 30.0
        renewals: list[Any] = []

        async def five_renewals() -> bool:
            await trio.lowlevel.checkpoint()
            [(renewed, expires)] = sql(
                dsn, "SELECT renewed_at, lease_expires FROM ndq_default_jobs"
            )
            assert (expires - renewed).total_seconds() == 30.0
            if not renewals or renewed != renewals[-1]:
                renewals.append(renewed)
            return len(renewals) == 6  # the claim, then five heartbeats

        await eventually(five_renewals, "five heartbeats")
        await queue.ack(job)
    # The first heartbeat comes at any instant after the claim; then one every second:
    # each sleeps a second, then renews, so never sooner, and not much later.
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(renewals[1:])]
    assert min(gaps) >= 0.99, gaps
    assert min(gaps) < 1.5, gaps


async def test_by_default_a_waiting_lock_looks_again_every_half_second(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nursery_down.queues import PostgresLock

    holder, waiter = PostgresLock(dsn, "stream"), PostgresLock(dsn, "stream")
    attempts: list[float] = []
    call = waiter._database.call

    async def counted(function: Callable[..., T], *args: Any) -> T:
        if function.__name__ == "_acquire_sync":
            attempts.append(trio.current_time())
        return await call(function, *args)

    monkeypatch.setattr(waiter._database, "call", counted)
    taken: list[bool] = []

    async def wait_for_the_lock() -> None:
        async with waiter.hold():
            taken.append(True)

    with trio.fail_after(PATIENCE):
        # The holder releases it first, then the nursery waits for the waiter to take it.
        async with trio.open_nursery() as nursery, holder.hold():
            nursery.start_soon(wait_for_the_lock)
            while len(attempts) < 5:
                await trio.sleep(0.05)  # the waiter's attempts: nothing to wait on but time
            assert not taken
    assert taken == [True]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Each look sleeps half a second after the one before: never sooner, and not much later.
    assert min(gaps) >= 0.5, gaps
    assert min(gaps) < 0.9, gaps
