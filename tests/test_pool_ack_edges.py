"""worker_pool's acks written behind the workers, at their edges.

Failing acks, acks slower than the grace, escalation and the grace deadline while
workers wait to hand an ack over, KeyboardInterrupt/SystemExit in a handler while
acks are pending, a restart while the crashed run's acks are pending, MemoryQueue's
inline acks, and real processes over a SQLiteQueue stopped by SIGTERM and SIGKILL.
"""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down.queues import MemoryQueue, QueuedJob, SQLiteQueue
from tests.polling import wait_for
from tests.queue_helpers import stats
from tests.test_pool import AckQueue, pool_service, sleeper

PROGRAM = Path(__file__).resolve().parent / "programs" / "ack_edges_sqlite_app.py"


def scripted(log: list[tuple[str, Any, float]]) -> Any:
    """A handler driven by the payload ``(seconds, what)``: sleep, then return or raise
    *what* (``"ok"``, ``"KeyboardInterrupt"``, ``"SystemExit"``)."""

    async def handler(job: QueuedJob) -> None:
        seconds, what = job.payload
        log.append(("start", job.id, trio.current_time()))
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            log.append(("cut", job.id, trio.current_time()))
            raise
        log.append(("done", job.id, trio.current_time()))
        if what == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if what == "SystemExit":
            raise SystemExit(7)

    return handler


def tasks_named(suffix: str) -> list[trio.lowlevel.Task]:
    """Every task in the run whose name ends with *suffix*."""

    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return [task for task in walk(root) if task.name.endswith(suffix)]


def when(log: list[tuple[str, Any, float]], event: str, job_id: int) -> float:
    """The time of *job_id*'s (only) *event* in *log*."""
    (moment,) = [t for e, j, t in log if (e, j) == (event, job_id)]
    return moment


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


# -- an ack that fails -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_pool_whose_every_ack_writer_failed_still_crashes(
    autojump_clock: trio.testing.MockClock,
    workers: int,
) -> None:
    # Jobs 1..workers finish at 1 s; their acks fail at 1.1 s, ending every writer.
    # Meanwhile each worker took its next job, which finishes at 2 s: with no writer
    # left, its worker acks it itself rather than wait for ever to hand it over.
    queue = AckQueue(ack_seconds=0.1, failing=set(range(1, workers + 1)))
    queue.put_many_nowait(range(3 * workers))
    sup = nd.Supervisor("app", grace=5.0)
    sup.add(
        nd.worker_pool(queue, sleeper(1, []), workers=workers), name="pool", restart="temporary"
    )
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.wait_state("pool", nd.ServiceState.FAILED)
    assert "the database refused the ack of job" in pool_service(sup)["last_error"]
    # The jobs running when the writers died finished (counted) and nothing is lost:
    # each is acked, or still leased (its lease recovers it), never dropped.
    assert queue.statistics().queued + queue.statistics().leased + queue.statistics().done == (
        3 * workers
    )


async def test_a_failing_ack_with_writers_left_crashes_the_pool_once_the_rest_are_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Three writers, one dies: the two others write every ack still to come.
    queue = AckQueue(ack_seconds=3, failing={1})
    queue.put_many_nowait(range(9))
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, []), workers=3), name="pool", restart="temporary")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.wait_state("pool", nd.ServiceState.FAILED)
            failed_at = trio.current_time()
    # Jobs 1-3 finished at 1 s, 4-6 at 2 s; the ack of 1 failed at 4 s, when 2 and 3
    # were written. 4-6 (running then) finished at 2 s and were handed over; job 7-9
    # were never claimed.
    assert sorted(job for _, job in queue.acked) == [2, 3, 4, 5, 6]
    assert queue.statistics() == stats(queued=3, leased=1, done=5)
    assert failed_at == pytest.approx(max(t for t, _ in queue.acked))
    service = pool_service(sup)
    assert (service["completed"], service["failed"]) == (6, 0)


# -- acks slower than the grace ----------------------------------------------------------


async def test_a_drain_waits_past_the_grace_for_a_slow_ack_and_cuts_running_jobs_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = AckQueue(ack_seconds=10)
    # Job 1 finishes at 1 s (its ack takes until 11 s); job 2 would run 100 s.
    queue.put_many_nowait([(1, "ok"), (100, "ok"), (1, "ok")])
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app", grace=5.0)
    sup.add(nd.worker_pool(queue, scripted(log), workers=2), name="pool")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await trio.sleep(1.5)
            await sup.drain()  # deadline 6.5 s
            await trio.sleep(6)
            assert when(log, "cut", 2) == pytest.approx(6.5)
            # The acks of 1 (until 11 s) and 3 (until 12 s) are still being written.
            assert sup.state_of("pool") is nd.ServiceState.DRAINING
            assert queue.acks_waiting == 2
            await sup.wait_finished()
            assert trio.current_time() == pytest.approx(12)
    # The worker of job 1 took job 3 at 1 s, before the drain: it ran to 2 s, was acked.
    assert sorted(job for _, job in queue.acked) == [1, 3]
    assert queue.statistics() == stats(queued=1, done=2)  # job 2 released, not lost
    service = pool_service(sup)
    assert (service["completed"], service["hard_cancelled"]) == (2, 1)
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


async def test_acks_still_written_at_the_grace_deadline_make_the_drain_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The drain waits for acks slower than the grace, and nothing is released. The
    # service outlives its grace (its ack writers wait for the database): as for any
    # service still running at the deadline, that counts as cut and the exit code says
    # the grace was exceeded (3), though every job finished and was acked.
    queue = AckQueue(ack_seconds=10)
    queue.put_many_nowait(range(2))
    sup = nd.Supervisor("app", grace=5.0)
    sup.add(nd.worker_pool(queue, sleeper(1, []), workers=2), name="pool")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await trio.sleep(1.5)
            await sup.drain()
            await sup.wait_finished()
            assert trio.current_time() == pytest.approx(11)  # the drain waited for both acks
    assert queue.statistics() == stats(done=2)
    service = pool_service(sup)
    assert (service["completed"], service["failed"], service["hard_cancelled"]) == (2, 0, 0)
    assert service["cut"] == 1
    assert sup.exit_code == nd.EXIT_HARD_CANCELLED


# -- the deadline and escalate while a worker waits to hand its ack over -----------------


@pytest.mark.parametrize("how", ["escalate", "deadline"])
async def test_a_hand_over_waiting_for_a_writer_is_never_cut(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    gate = trio.Event()
    queue = AckQueue(ack_gate=gate)
    # 1 and 2 end at 1 s and hold both writers (gated). Then 3 ends at 3 s and its
    # worker waits for a writer; 4 runs for 100 s.
    queue.put_many_nowait([(1, "ok"), (1, "ok"), (2, "ok"), (100, "ok")])
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app", grace=5.0)
    sup.add(nd.worker_pool(queue, scripted(log), workers=2), name="pool")
    with trio.fail_after(200):
        async with nd.open_supervisor(sup):
            try:
                if how == "escalate":
                    await trio.sleep(4)  # 3 waits for a writer, with no deadline
                    await sup.drain()
                    await trio.sleep(1)
                    await sup.escalate()
                    cut_at = 5.0
                else:
                    await trio.sleep(1.5)
                    await sup.drain()  # 3 ends under the drain's deadline (6.5 s)
                    cut_at = 6.5
                await trio.sleep(10)
                assert when(log, "cut", 4) == pytest.approx(cut_at)
                assert when(log, "done", 3) == pytest.approx(3)
                assert queue.acks_waiting == 2  # 1 and 2; 3 still waits for a writer
                assert sup.state_of("pool") is nd.ServiceState.DRAINING
            finally:
                gate.set()
            await sup.wait_finished()
    assert sorted(job for _, job in queue.acked) == [1, 2, 3]
    assert queue.statistics() == stats(queued=1, done=3)  # 4 released
    service = pool_service(sup)
    assert (service["completed"], service["hard_cancelled"]) == (3, 1)


# -- KeyboardInterrupt and SystemExit in a handler ---------------------------------------


@pytest.mark.parametrize("what", ["KeyboardInterrupt", "SystemExit"])
async def test_a_handler_raising_a_base_exception_leaves_pending_acks_written(
    autojump_clock: trio.testing.MockClock, what: str
) -> None:
    queue = AckQueue(ack_seconds=5)
    # 1 ends at 1 s (ack until 6 s), then its worker runs 3 (until 4 s, ack until 9 s);
    # 2 raises at 2 s.
    queue.put_many_nowait([(1, "ok"), (2, what), (3, "ok"), (1, "ok"), (1, "ok")])
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, scripted(log), workers=2), name="pool")
    raised: BaseException | None = None
    try:
        with trio.fail_after(100):
            async with nd.open_supervisor(sup):
                await trio.sleep(1000)
    except BaseException as exc:  # KeyboardInterrupt, SystemExit, groups
        raised = exc
    assert raised is not None
    assert {type(leaf).__name__ for leaf in leaves(raised)} == {what}
    assert sorted(job for _, job in queue.acked) == [1, 3]
    assert max(t for t, _ in queue.acked) == pytest.approx(9)
    # 2 went back (not lost), 4 and 5 were never claimed, nothing stays leased.
    assert queue.statistics() == stats(queued=3, done=2)
    assert [job.id for job in [queue.claim_nowait() for _ in range(3)]] == [2, 4, 5]


# -- a restart while the crashed run's acks are pending ----------------------------------


async def test_a_restart_starts_only_once_the_crashed_runs_acks_are_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Jobs 1 and 2 end at 1 s; their acks take 5 s. The claim for the next jobs fails,
    # crashing the run at 1 s with both acks pending.
    queue = AckQueue(ack_seconds=5, failing_claim=2)
    queue.put_many_nowait(range(8))
    log: list[tuple[str, Any, float]] = []
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, log), workers=2), name="pool", restart="permanent")
    with trio.fail_after(200):
        async with nd.open_supervisor(sup):
            while queue.statistics().done < 8:
                await trio.sleep(0.5)
            service = pool_service(sup)
    assert service["restarts"] == 1
    assert "the database refused the claim" in str(service["last_error"])
    first_run_acks = [t for t, job in queue.acked if job in (1, 2)]
    assert first_run_acks == [pytest.approx(6), pytest.approx(6)]
    second_run_claims = [t for t, job in queue.claimed if job > 2]
    assert min(second_run_claims) >= max(first_run_acks)
    # Every job ran once and was acked once: nothing twice, nothing lost.
    assert collections.Counter(job for _, job in queue.acked) == dict.fromkeys(range(1, 9), 1)
    assert sorted(job for event, job, _ in log if event == "done") == list(range(1, 9))
    assert queue.statistics() == stats(done=8)


# -- MemoryQueue: acked inline, as before ------------------------------------------------


class InlineOnlyQueue(MemoryQueue):
    """A MemoryQueue whose awaitable ack must never be used (``ack_nowait`` is)."""

    async def ack(self, job: QueuedJob) -> None:
        raise AssertionError("the pool awaited ack() on a source with ack_nowait")


async def test_a_source_with_ack_nowait_is_acked_inline_with_no_ack_writers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = InlineOnlyQueue()
    queue.put_many_nowait(range(9))
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, []), workers=3), name="pool")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.wait_state("pool", nd.ServiceState.RUNNING)
            assert tasks_named("pool ack") == []
            assert len(tasks_named("pool worker")) == 3
            for second in (1, 2, 3):
                await trio.sleep_until(second)
                await trio.testing.wait_all_tasks_blocked()
                # Acked in the very instant each round finished.
                assert queue.statistics().done == 3 * second
    assert queue.statistics() == stats(done=9)
    assert sup.exit_code == nd.EXIT_OK


async def test_a_source_without_ack_nowait_has_one_ack_writer_per_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = AckQueue(ack_seconds=0.5)
    queue.put_many_nowait(range(6))
    sup = nd.Supervisor("app")
    sup.add(nd.worker_pool(queue, sleeper(1, []), workers=3), name="pool")
    with trio.fail_after(100):
        async with nd.open_supervisor(sup):
            await sup.wait_state("pool", nd.ServiceState.RUNNING)
            assert len(tasks_named("pool ack")) == 3
            while queue.statistics().done < 6:
                await trio.sleep(0.25)
        assert tasks_named("pool ack") == []  # none outlives the service
    assert queue.statistics() == stats(done=6)


# -- real processes over a SQLiteQueue ---------------------------------------------------

CLI = Path(sys.executable).with_name("nursery-down")
JOBS = 400


def _fill(db: Path, payloads: list[int]) -> None:
    async def main() -> None:
        async with SQLiteQueue(db) as queue:
            await queue.put_many(payloads)

    trio.run(main)


def _query(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(db)
    try:
        return list(connection.execute(sql, args))
    finally:
        connection.close()


def _counts(db: Path) -> dict[str, int]:
    counts = {"queued": 0, "leased": 0}
    counts.update(dict(_query(db, "SELECT state, count(*) FROM jobs GROUP BY state")))
    return counts


def _ledger(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [
        (int(fields[1]), int(fields[2]))
        for fields in (line.split() for line in path.read_text().splitlines())
        if len(fields) == 3 and fields[0] == "done"
    ]


def _acks(db: Path) -> list[tuple[int, int]]:
    return [
        (int(j), int(p))
        for j, p in _query(db, "SELECT job_id, pid FROM history WHERE event = 'ack'")
    ]


def _start(tmp_path: Path, db: Path, ledger: Path, name: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(ACK_EDGES_DB=str(db), ACK_EDGES_LEDGER=str(ledger), ACK_EDGES_ACK_MS="60")
    with open(tmp_path / f"output-{name}", "wb") as sink:
        return subprocess.Popen(
            [str(CLI), "run", f"{PROGRAM}:sup", "--no-dashboard"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _wait_exit(process: subprocess.Popen[bytes], tmp_path: Path, name: str) -> int:
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(
            f"{name} did not exit:\n{(tmp_path / f'output-{name}').read_text()}"
        ) from None


def test_sigterm_with_acks_pending_exits_0_with_every_finished_job_acked(tmp_path: Path) -> None:
    db, ledger = tmp_path / "jobs.db", tmp_path / "ledger"
    _fill(db, [20] * JOBS)
    process = _start(tmp_path, db, ledger, "first")
    try:
        wait_for(lambda: len(_ledger(ledger)) >= 40, what="40 finished jobs", process=process)
        process.send_signal(signal.SIGTERM)
        code = _wait_exit(process, tmp_path, "first")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, (tmp_path / "output-first").read_text()
    finished = [job for job, pid in _ledger(ledger) if pid == process.pid]
    assert len(finished) == len(set(finished))
    acked = _acks(db)
    assert sorted(job for job, _ in acked) == sorted(finished)  # every finished job acked once
    counts = _counts(db)
    assert counts["leased"] == 0
    assert counts["queued"] == JOBS - len(finished)
    assert _query(db, "SELECT value FROM counters WHERE name = 'done'") == [(len(finished),)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_after_a_sigkill_a_new_process_runs_exactly_the_jobs_not_acked(
    tmp_path: Path, seed: int
) -> None:
    db, ledger = tmp_path / "jobs.db", tmp_path / "ledger"
    _fill(db, [20] * JOBS)
    first = _start(tmp_path, db, ledger, "first")
    try:
        # Killed at some instant with jobs running and acks pending.
        wait_for(
            lambda: len(_ledger(ledger)) >= 10 + 17 * seed, what="finished jobs", process=first
        )
        time.sleep(0.013 * seed)  # a varied instant of the kill, not a synchronisation
        first.kill()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    acked_by_first = {job for job, _ in _acks(db)}
    finished_by_first = {job for job, pid in _ledger(ledger) if pid == first.pid}
    assert acked_by_first <= finished_by_first  # an ack is written only after its job ran
    second = _start(tmp_path, db, ledger, "second")
    try:
        wait_for(
            lambda: _counts(db) == {"queued": 0, "leased": 0},
            timeout=60,
            what="an empty queue",
            process=second,
        )
        second.send_signal(signal.SIGTERM)
        assert _wait_exit(second, tmp_path, "second") == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    run_by_second = [job for job, pid in _ledger(ledger) if pid == second.pid]
    # Exactly the jobs the first process did not ack ran again, each once.
    assert sorted(run_by_second) == sorted(set(range(1, JOBS + 1)) - acked_by_first)
    acks = collections.Counter(job for job, _ in _acks(db))
    assert acks == dict.fromkeys(range(1, JOBS + 1), 1)
    assert _query(db, "SELECT value FROM counters WHERE name = 'done'") == [(JOBS,)]
