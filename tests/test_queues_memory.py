"""MemoryQueue: claim, ack, release, fail, dead letters, statistics and closing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down.queues import (
    JobSource,
    MemoryQueue,
    NotLeasedError,
    QueuedJob,
)
from tests.queue_helpers import stats


def test_memory_queue_is_a_job_source() -> None:
    assert isinstance(MemoryQueue(), JobSource)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_attempts_must_be_a_positive_whole_number(bad: object) -> None:
    with pytest.raises(nd.ConfigurationError, match="max_attempts"):
        MemoryQueue(max_attempts=bad)  # type: ignore[arg-type]


async def test_claims_oldest_first_and_ack_counts_done() -> None:
    queue = MemoryQueue()
    ids = queue.put_many_nowait(["a", "b"])
    assert ids == [1, 2]
    assert await queue.put("c") == 3
    first = await queue.claim()
    assert first == QueuedJob(1, "a", 0)
    assert queue.statistics() == stats(queued=2, leased=1)
    await queue.ack(first)
    assert queue.statistics() == stats(queued=2, done=1)
    assert [await queue.claim() for _ in range(2)] == [QueuedJob(2, "b", 0), QueuedJob(3, "c", 0)]


async def test_payload_is_stored_as_is() -> None:
    queue = MemoryQueue()
    payload = object()
    queue.put_nowait(payload)
    job = await queue.claim()
    assert job is not None
    assert job.payload is payload


async def test_claim_waits_for_a_put(autojump_clock: trio.testing.MockClock) -> None:
    queue = MemoryQueue()
    claimed: list[QueuedJob | None] = []

    async def claimer() -> None:
        claimed.append(await queue.claim())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claimer)
        await trio.sleep(5)
        assert claimed == []
        queue.put_nowait("late")
    assert claimed == [QueuedJob(1, "late", 0)]
    assert trio.current_time() == pytest.approx(5)


async def test_cancelled_claim_claims_nothing(autojump_clock: trio.testing.MockClock) -> None:
    queue = MemoryQueue()
    with trio.move_on_after(1):
        await queue.claim()
    queue.put_nowait("x")
    assert queue.statistics() == stats(queued=1)
    assert queue.claim_nowait() == QueuedJob(1, "x", 0)


def test_claim_nowait_raises_would_block_when_empty() -> None:
    with pytest.raises(trio.WouldBlock):
        MemoryQueue().claim_nowait()


async def test_release_puts_the_job_back_in_front_without_counting_an_attempt() -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(["a", "b"])
    job = await queue.claim()
    assert job is not None
    await queue.release(job)
    assert queue.statistics() == stats(queued=2)
    assert await queue.claim() == QueuedJob(1, "a", 0)


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
async def test_released_jobs_are_claimed_again_in_their_first_order(order: list[int]) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(["a", "b", "c", "d"])
    claimed = [queue.claim_nowait() for _ in range(3)]
    for index in order:
        await queue.release(claimed[index])
    assert [queue.claim_nowait().payload for _ in range(4)] == ["a", "b", "c", "d"]


async def test_fail_counts_an_attempt_and_retries_after_the_others() -> None:
    queue = MemoryQueue(max_attempts=3)
    queue.put_many_nowait(["a", "b"])
    job = await queue.claim()
    assert job is not None
    await queue.fail(job, ValueError("boom"))
    assert queue.statistics() == stats(queued=2)
    assert await queue.claim() == QueuedJob(2, "b", 0)
    assert await queue.claim() == QueuedJob(1, "a", 1)


async def test_job_is_dead_lettered_after_max_attempts() -> None:
    queue = MemoryQueue(max_attempts=2)
    queue.put_nowait({"poison": True})
    for attempt in range(2):
        job = await queue.claim()
        assert job is not None
        assert job.attempts == attempt
        await queue.fail(job, RuntimeError(f"attempt {attempt}"))
    assert queue.statistics() == stats(dead=1)
    (dead,) = queue.dead_letters()
    assert (dead.id, dead.payload, dead.attempts, dead.error) == (
        1,
        {"poison": True},
        2,
        "RuntimeError: attempt 1",
    )


async def test_fail_accepts_a_message_string() -> None:
    queue = MemoryQueue(max_attempts=1)
    queue.put_nowait("x")
    job = await queue.claim()
    assert job is not None
    await queue.fail(job, "gave up")
    assert queue.dead_letters()[0].error == "gave up"


@pytest.mark.parametrize("action", ["ack", "release", "fail"])
async def test_settling_a_job_twice_raises_not_leased(action: str) -> None:
    queue = MemoryQueue()
    queue.put_nowait("x")
    job = await queue.claim()
    assert job is not None
    await queue.ack(job)

    async def fail_again(job: QueuedJob) -> None:
        await queue.fail(job, "again")

    settle = {"ack": queue.ack, "release": queue.release, "fail": fail_again}[action]
    with pytest.raises(NotLeasedError, match=f"cannot {action} job 1"):
        await settle(job)
    assert queue.statistics() == stats(done=1)


async def test_settling_another_queues_job_raises_and_keeps_the_real_lease() -> None:
    ours, theirs = MemoryQueue(), MemoryQueue()
    ours.put_nowait("ours")
    theirs.put_nowait("theirs")
    our_job = await ours.claim()
    their_job = await theirs.claim()
    assert our_job is not None
    assert their_job is not None
    assert our_job.id == their_job.id == 1
    with pytest.raises(NotLeasedError):
        await ours.ack(their_job)
    assert ours.statistics() == stats(leased=1)
    await ours.ack(our_job)


async def test_closed_queue_hands_out_the_rest_then_returns_none() -> None:
    queue = MemoryQueue()
    queue.put_nowait("last")
    queue.close()
    assert queue.closed
    with pytest.raises(trio.ClosedResourceError):
        queue.put_nowait("more")
    job = await queue.claim()
    assert job is not None
    await queue.ack(job)
    assert await queue.claim() is None


async def test_closed_queue_waits_for_leases_that_may_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_nowait("x")
    job = await queue.claim()
    assert job is not None
    queue.close()
    results: list[QueuedJob | None] = []

    async def claimer() -> None:
        results.append(await queue.claim())
        results.append(await queue.claim())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claimer)
        await trio.sleep(1)
        assert results == []  # the leased job may still be released: keep waiting
        await queue.release(job)
        await trio.sleep(1)
        assert results == [job]
        await queue.ack(job)
    assert results == [job, None]


async def test_by_default_a_job_is_dead_lettered_at_its_fifth_failed_attempt() -> None:
    queue = MemoryQueue()
    queue.put_nowait("poison")
    for attempt in range(5):
        assert queue.statistics() == stats(queued=1)
        job = await queue.claim()
        assert job is not None
        assert job.attempts == attempt
        await queue.fail(job, "bad")
    assert queue.statistics() == stats(dead=1)
    assert queue.dead_letters()[0].attempts == 5
