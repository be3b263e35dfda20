"""worker_pool under a real Supervisor: claiming, draining, grace, hard-cancel, failures."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down.queues import MemoryQueue, QueuedJob, SQLiteQueue
from tests.queue_helpers import stats


class RecordingQueue(MemoryQueue):
    """A MemoryQueue that notes when each job was claimed."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.claims: list[tuple[float, int]] = []

    async def claim(self) -> QueuedJob | None:
        job = await super().claim()
        if job is not None:
            self.claims.append((trio.current_time(), job.id))
        return job

    def claim_nowait(self) -> QueuedJob:
        job = super().claim_nowait()
        self.claims.append((trio.current_time(), job.id))
        return job


class BatchQueue(MemoryQueue):
    """A MemoryQueue that claims in batches (``claim_many``), noting each batch.

    *gate*, when given, holds each batch after it was claimed until it is set, as a
    slow transaction would (shielded: a claim that went through is never dropped).
    """

    def __init__(self, gate: trio.Event | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.batches: list[tuple[int, int]] = []  # (limit asked, jobs returned)
        self.gate = gate

    async def claim_many(self, limit: int) -> list[QueuedJob]:
        first = await self.claim()
        if first is None:
            return []
        jobs = [first]
        while len(jobs) < limit:
            try:
                jobs.append(self.claim_nowait())
            except trio.WouldBlock:
                break
        self.batches.append((limit, len(jobs)))
        # (Bounded, so that a failing test ends rather than waiting forever.)
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            if self.gate is not None:
                await self.gate.wait()
            await trio.lowlevel.checkpoint()
        return jobs


def sleeper(seconds: float, log: list[tuple[str, Any, float]]) -> Any:
    """A handler that sleeps *seconds* per job, logging start, done or cut."""

    async def handler(job: QueuedJob) -> None:
        log.append(("start", job.id, trio.current_time()))
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            log.append(("cut", job.id, trio.current_time()))
            raise
        log.append(("done", job.id, trio.current_time()))

    return handler


def pool_service(sup: nd.Supervisor) -> dict[str, Any]:
    (service,) = sup.snapshot()["services"]
    assert isinstance(service, dict)
    return service


def events(log: list[tuple[str, Any, float]], kind: str) -> list[Any]:
    return [job_id for event, job_id, _ in log if event == kind]


async def test_pool_runs_every_job_on_its_workers_and_acks_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(range(50))
    queue.close()
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=5), name="pool", restart="transient")
    async with nd.open_supervisor(sup) as running:
        await running.wait_finished()  # the source is closed: the pool returns when it is empty
    assert trio.current_time() == pytest.approx(10)  # 50 one-second jobs on 5 workers
    assert sorted(events(log, "done")) == list(range(1, 51))
    assert queue.statistics() == stats(done=50)
    service = pool_service(sup)
    assert (service["completed"], service["failed"], service["hard_cancelled"]) == (50, 0, 0)
    assert service["state"] == "stopped"
    assert sup.exit_code == nd.EXIT_OK


async def test_jobs_are_in_flight_jobs_of_the_service_and_never_buffered_past_the_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(range(10))
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(10, []), workers=3), name="pool")
    async with nd.open_supervisor(sup):
        assert sup.state_of("pool") is nd.ServiceState.RUNNING
        await trio.sleep(1)
        service = pool_service(sup)
        assert service["in_flight"] == 3
        assert sorted(job["key"] for job in service["jobs"]) == [1, 2, 3]
        assert [job["age"] for job in service["jobs"]] == [1, 1, 1]
        assert [job["deadline"] for job in service["jobs"]] == [None] * 3
        # Three running, and one the producer holds until a worker is free: no buffer.
        assert queue.statistics() == stats(queued=6, leased=4)
        await sup.escalate()


async def test_drain_stops_claiming_at_once_and_releases_the_claimed_unstarted_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = RecordingQueue()
    queue.put_many_nowait(range(10))
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app", grace=30)
    sup.add(nd.worker_pool(queue, sleeper(10, log), workers=2), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        assert queue.statistics() == stats(queued=7, leased=3)
        await sup.drain("pool")
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == pytest.approx(1)
        # The job the producer held went back at once; only the two running stay out.
        assert queue.statistics() == stats(queued=8, leased=2)
        service = pool_service(sup)
        assert [job["time_left"] for job in service["jobs"]] == [30, 30]
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
        # In-flight jobs finished within the grace, then were acked.
        assert trio.current_time() == pytest.approx(10)
        assert queue.statistics() == stats(queued=8, done=2)
    assert [moment for moment, _ in queue.claims] == [0, 0, 0]
    assert sorted(events(log, "start")) == [1, 2]
    assert sorted(events(log, "done")) == [1, 2]
    service = pool_service(sup)
    assert (service["completed"], service["hard_cancelled"]) == (2, 0)
    assert sup.exit_code == nd.EXIT_OK


async def test_whole_app_drain_lets_jobs_finish_then_exits_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(range(4))
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app", grace=30)
    sup.add(nd.worker_pool(queue, sleeper(5, log), workers=4), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
    # Leaving the block drained the app: the four running jobs finished at t=5.
    assert trio.current_time() == pytest.approx(5)
    assert queue.statistics() == stats(done=4)
    assert sup.exit_code == nd.EXIT_OK


async def test_grace_overrun_hard_cancels_and_releases_the_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(range(5))
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app", grace=2)
    sup.add(nd.worker_pool(queue, sleeper(10, log), workers=2), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await sup.drain("pool")
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
        assert trio.current_time() == pytest.approx(3)
    assert sorted((job_id, moment) for event, job_id, moment in log if event == "cut") == [
        (1, 3),
        (2, 3),
    ]
    service = pool_service(sup)
    assert (service["completed"], service["failed"], service["hard_cancelled"]) == (0, 0, 2)
    assert service["in_flight"] == 0
    # Back in the queue, unstarted as far as attempts go.
    assert queue.statistics() == stats(queued=5)
    claimed = sorted((queue.claim_nowait() for _ in range(5)), key=lambda job: job.id)
    assert claimed == [QueuedJob(i, i - 1, 0) for i in range(1, 6)]
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_escalate_hard_cancels_running_jobs_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(range(3))
    sup = nd.Supervisor("app", grace=30)
    sup.add(nd.worker_pool(queue, sleeper(10, []), workers=3), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await sup.drain("pool")
        await trio.sleep(1)
        await sup.escalate("pool")
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
        assert trio.current_time() == pytest.approx(2)
    assert pool_service(sup)["hard_cancelled"] == 3
    assert queue.statistics() == stats(queued=3)


async def test_extend_grace_moves_the_running_jobs_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_many_nowait(range(2))
    sup = nd.Supervisor("app", grace=2)
    sup.add(nd.worker_pool(queue, sleeper(5, []), workers=2), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await sup.drain("pool")
        await trio.sleep(1)
        await sup.extend_grace(10, "pool")
        assert [job["time_left"] for job in pool_service(sup)["jobs"]] == [11, 11]
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
        assert trio.current_time() == pytest.approx(5)
    assert (pool_service(sup)["completed"], pool_service(sup)["hard_cancelled"]) == (2, 0)
    assert queue.statistics() == stats(done=2)


async def test_handler_error_fails_the_job_dead_letters_it_and_the_pool_keeps_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue(max_attempts=3)
    queue.put_many_nowait(["ok", "poison", "ok", "ok"])
    attempts: list[int] = []

    async def handler(job: QueuedJob) -> None:
        await trio.sleep(1)
        if job.payload == "poison":
            attempts.append(job.attempts)
            raise ValueError("cannot handle this one")

    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, handler, workers=2), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(10)
        assert queue.statistics() == stats(done=3, dead=1)
        assert attempts == [0, 1, 2]
        (dead,) = queue.dead_letters()
        assert (dead.payload, dead.attempts, dead.error) == (
            "poison",
            3,
            "ValueError: cannot handle this one",
        )
        service = pool_service(sup)
        assert (service["state"], service["restarts"]) == ("running", 0)
        assert (service["completed"], service["failed"]) == (3, 3)
        queue.put_nowait("after the errors")
        await trio.sleep(2)
        assert queue.statistics() == stats(done=4, dead=1)


async def test_a_retried_job_shows_its_attempt_on_the_dashboard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_nowait("flaky")

    async def handler(job: QueuedJob) -> None:
        if job.attempts == 0:
            raise RuntimeError("first try fails")
        await trio.sleep(10)

    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, handler, workers=1), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        assert [job["info"] for job in pool_service(sup)["jobs"]] == [{"attempt": 2}]
        await sup.escalate()


async def test_a_job_claimed_as_the_drain_begins_is_released_not_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=2), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)  # the producer waits in claim(), the workers in receive()
        queue.put_nowait("just in time")  # wakes the producer...
        await sup.drain("pool")  # ...but the drain begins in the same instant
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
    assert log == []
    assert queue.statistics() == stats(queued=1)
    assert pool_service(sup)["completed"] == 0


async def test_a_handler_that_swallows_the_deadline_still_gets_its_job_settled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue()
    queue.put_nowait("stubborn")

    async def handler(job: QueuedJob) -> None:
        # Wrong, but it must not leave the job half-settled.
        with contextlib.suppress(trio.Cancelled):
            await trio.sleep(10)

    sup = nd.Supervisor("app", grace=1)
    sup.add(nd.worker_pool(queue, handler, workers=1), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        await sup.drain("pool")
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
    assert queue.statistics() == stats(done=1)
    assert pool_service(sup)["completed"] == 1


async def test_a_batch_claiming_source_is_asked_for_one_job_per_idle_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = BatchQueue()
    queue.put_many_nowait(range(20))
    queue.close()
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=4), name="pool", restart="transient")
    async with nd.open_supervisor(sup) as running:
        await trio.sleep(0.5)
        # One claim for the four idle workers; none held ahead while all are busy.
        assert queue.batches == [(4, 4)]
        assert queue.statistics() == stats(queued=16, leased=4)
        await running.wait_finished()
    assert sorted(events(log, "done")) == list(range(1, 21))
    assert queue.statistics() == stats(done=20)
    # The four finish together each second, and one claim takes the next four.
    assert queue.batches == [(4, 4)] * 5
    assert trio.current_time() == pytest.approx(5)  # 20 one-second jobs on 4 workers


async def test_a_batch_claiming_pool_claims_for_each_worker_as_it_becomes_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = BatchQueue()
    queue.put_many_nowait(range(1, 11))
    queue.close()
    durations = iter([1, 2, 3] + [1] * 7)

    async def handler(job: QueuedJob) -> None:
        await trio.sleep(next(durations))

    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, handler, workers=3), name="pool", restart="transient")
    async with nd.open_supervisor(sup) as running:
        most = 0
        while sup.state_of("pool") is not nd.ServiceState.STOPPED:
            most = max(most, queue.statistics().leased)
            await trio.sleep(0.25)
        await running.wait_finished()
    assert most == 3  # never a job claimed ahead of a free worker
    assert queue.statistics() == stats(done=10)
    assert queue.batches[0] == (3, 3)
    assert all(size == limit for limit, size in queue.batches[:-1])


async def test_a_batch_claimed_as_the_drain_begins_goes_back_unstarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    queue = BatchQueue(gate)
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=3), name="pool")
    async with nd.open_supervisor(sup):
        await trio.sleep(1)
        queue.put_many_nowait(["a", "b", "c"])
        await trio.testing.wait_all_tasks_blocked()
        assert queue.batches == [(3, 3)]  # claimed, not yet handed over
        await sup.drain("pool")
        gate.set()
        await sup.wait_state("pool", nd.ServiceState.STOPPED)
    assert log == []
    assert queue.statistics() == stats(queued=3)
    assert [job.id for job in [queue.claim_nowait() for _ in range(3)]] == [1, 2, 3]


class AckQueue(BatchQueue):
    """A batch-claiming queue with database-like acks (no ``ack_nowait``).

    Each ack takes *ack_seconds*, then waits for *ack_gate* if given; the acks of
    the ids in *failing* raise, and so does the *failing_claim*-th claim. Every claim
    and every written ack is noted with the trio time.
    """

    ack_nowait = None  # type: ignore[assignment]

    def __init__(
        self,
        *,
        ack_seconds: float = 0.0,
        ack_gate: trio.Event | None = None,
        failing: set[int] | None = None,
        failing_claim: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.ack_seconds = ack_seconds
        self.ack_gate = ack_gate
        self.failing = failing or set()
        self.failing_claim = failing_claim  # the claim_many call (1-based) that raises
        self.claim_calls = 0
        self.acks_waiting = 0
        self.acked: list[tuple[float, int]] = []
        self.claimed: list[tuple[float, int]] = []

    async def claim_many(self, limit: int) -> list[QueuedJob]:
        self.claim_calls += 1
        if self.claim_calls == self.failing_claim:
            raise RuntimeError("the database refused the claim")
        jobs = await super().claim_many(limit)
        self.claimed.extend((trio.current_time(), job.id) for job in jobs)
        return jobs

    async def ack(self, job: QueuedJob) -> None:
        self.acks_waiting += 1
        try:
            await trio.sleep(self.ack_seconds)
            if self.ack_gate is not None:
                await self.ack_gate.wait()
            if job.id in self.failing:
                raise RuntimeError(f"the database refused the ack of job {job.id}")
            MemoryQueue.ack_nowait(self, job)
            self.acked.append((trio.current_time(), job.id))
        finally:
            self.acks_waiting -= 1


async def test_a_worker_takes_its_next_job_while_its_last_ack_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = AckQueue(ack_seconds=0.5)
    queue.put_many_nowait(range(20))
    queue.close()
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=4), name="pool", restart="transient")
    async with nd.open_supervisor(sup) as running:
        await trio.sleep(1.25)
        # The first four finished at 1 s; their acks are on their way, the next four run.
        assert queue.acks_waiting == 4
        assert queue.statistics() == stats(queued=12, leased=8)
        assert pool_service(sup)["in_flight"] == 4
        await running.wait_finished()
        # Acked one after the other, the 20 jobs would take 5 x 1.5 s; written behind
        # the workers, 5 x 1 s and the last ack. The service ended after that ack.
        assert trio.current_time() == pytest.approx(5.5)
    assert queue.statistics() == stats(done=20)
    assert sorted(events(log, "done")) == list(range(1, 21))


async def test_at_most_one_ack_per_worker_waits_to_be_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    queue = AckQueue(ack_gate=gate)
    queue.put_many_nowait(range(10))
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=2), name="pool")
    async with nd.open_supervisor(sup):
        try:
            await trio.sleep(10)
            # Two acks with the writers, and two workers waiting to hand theirs over:
            # nothing more was claimed, however long the database takes.
            assert queue.acks_waiting == 2
            assert sorted(events(log, "done")) == [1, 2, 3, 4]
            assert queue.statistics() == stats(queued=6, leased=4)
        finally:
            gate.set()  # else the pool waits for its acks for ever
        while queue.statistics().done < 10:
            await trio.sleep(1)
    assert sorted(events(log, "done")) == list(range(1, 11))


async def test_a_drain_ends_only_once_every_ack_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    queue = AckQueue(ack_gate=gate)
    queue.put_many_nowait(range(3))
    sup = nd.Supervisor("app", grace=5.0)
    sup.add(nd.worker_pool(queue, sleeper(1, []), workers=3), name="pool")
    async with nd.open_supervisor(sup):
        try:
            await trio.sleep(2)
            assert queue.acks_waiting == 3
            await sup.drain()
            await trio.sleep(4)
            assert sup.state_of("pool") is nd.ServiceState.DRAINING
        finally:
            gate.set()
        await sup.wait_finished()
    assert queue.statistics() == stats(done=3)
    assert sup.exit_code == nd.EXIT_OK
    assert pool_service(sup)["hard_cancelled"] == 0


async def test_an_ack_that_fails_crashes_the_pool_and_the_other_jobs_still_settle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = AckQueue(ack_seconds=0.1, failing={2})
    queue.put_many_nowait(range(6))
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, []), workers=3), name="pool", restart="temporary")
    async with nd.open_supervisor(sup):
        await sup.wait_state("pool", nd.ServiceState.FAILED)
        service = pool_service(sup)
    assert "the database refused the ack of job 2" in service["last_error"]
    # Jobs 4 to 6 were running when the ack failed: they finished and were acked, as
    # were 1 and 3. Job 2 stays leased (its lease recovers it, as after a crash).
    assert queue.statistics() == stats(leased=1, done=5)
    assert service["completed"] == 6


async def test_pool_over_a_sqlite_queue(tmp_path: Path) -> None:
    done: list[int] = []

    async def handler(job: QueuedJob) -> None:
        await trio.sleep(0.01)
        done.append(job.payload)

    async with SQLiteQueue(tmp_path / "jobs.db", synchronous="NORMAL") as queue:
        await queue.put_many(range(30))
        sup = nd.Supervisor("app")
        sup.add(nd.worker_pool(queue, handler, workers=5), name="pool")
        with trio.fail_after(20):
            async with nd.open_supervisor(sup):
                while (await queue.statistics()).done < 30:
                    await trio.sleep(0.05)
        assert sorted(done) == list(range(30))
        assert await queue.statistics() == stats(done=30)
    assert sup.exit_code == nd.EXIT_OK


def test_worker_pool_names_its_service_function() -> None:
    async def handler(job: QueuedJob) -> None:
        pass

    assert nd.worker_pool(MemoryQueue(), handler).__name__ == "worker_pool"
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(MemoryQueue(), handler, name="orders"))
    assert sup.service_names == ["orders"]


@pytest.mark.parametrize(
    ("source", "handler", "workers", "message"),
    [
        (object(), "async", 1, "needs a job source"),
        (MemoryQueue(), "sync", 1, "must be an async function"),
        (MemoryQueue(), "async", 0, "workers must be"),
        (MemoryQueue(), "async", 2.5, "workers must be"),
    ],
)
def test_worker_pool_rejects_bad_arguments(
    source: Any, handler: str, workers: Any, message: str
) -> None:
    async def async_handler(job: QueuedJob) -> None:
        pass

    def sync_handler(job: QueuedJob) -> None:
        pass

    chosen = async_handler if handler == "async" else sync_handler
    with pytest.raises(nd.ConfigurationError, match=message):
        nd.worker_pool(source, chosen, workers=workers)  # type: ignore[arg-type]
