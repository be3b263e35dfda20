"""Job sources and worker_pool, measured against baselines run in the same process.

1. worker_pool over a MemoryQueue vs a raw trio worker pool (20 workers, memory
   channel), trivial jobs: rounds alternate between the two, and the ratio of the
   best rounds is reported (goal: >= 0.85).
2. SQLiteQueue: put, and claim+ack, in jobs per second, for both durability modes.
3. Memory per in-flight job with 10,000 jobs in flight (goal: <= 2 KiB beyond the
   handler's own), measured with tracemalloc.

Run: ``python benchmarks/queues.py`` (about 30 s); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import trio
import trio.testing

import nursery_down as nd
from nursery_down.queues import MemoryQueue, QueuedJob, SQLiteQueue

QUICK = "--quick" in sys.argv
WORKERS = 20
MODES: tuple[Literal["FULL", "NORMAL"], ...] = ("FULL", "NORMAL")


async def trivial(job: Any) -> None:
    """The job of the throughput rounds: nothing at all."""


# -- 1. worker_pool vs a raw trio pool -------------------------------------------------------


async def raw_pool_round(jobs: int) -> float:
    """A bare trio worker pool: one producer, WORKERS workers, an unbuffered channel."""
    send, receive = trio.open_memory_channel[int](0)

    async def worker(channel: trio.MemoryReceiveChannel[int]) -> None:
        async with channel:
            async for item in channel:
                await trivial(item)

    gc.collect()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        async with receive:
            for _ in range(WORKERS):
                nursery.start_soon(worker, receive.clone())
        async with send:
            for item in range(jobs):
                await send.send(item)
    return jobs / (time.perf_counter() - started)


async def worker_pool_round(jobs: int) -> float:
    """worker_pool under a Supervisor, over a MemoryQueue filled (and closed) beforehand."""
    queue = MemoryQueue()
    queue.put_many_nowait(range(jobs))
    queue.close()
    sup = nd.Supervisor("bench")
    sup.add(nd.worker_pool(queue, trivial, workers=WORKERS), name="pool", restart="transient")
    gc.collect()
    started = time.perf_counter()
    async with nd.open_supervisor(sup) as running:
        await running.wait_finished()
    elapsed = time.perf_counter() - started
    assert queue.statistics().done == jobs
    return jobs / elapsed


async def compare_pools() -> None:
    # Many short rounds, each pool right after the other: a busy neighbour on the
    # machine slows both of a pair alike, and the best rounds show the code itself.
    jobs, rounds = (5_000, 5) if QUICK else (10_000, 25)
    raw: list[float] = []
    pool: list[float] = []
    await raw_pool_round(jobs // 10)  # warm up both paths
    await worker_pool_round(jobs // 10)
    for _ in range(rounds):
        raw.append(await raw_pool_round(jobs))
        pool.append(await worker_pool_round(jobs))
    best = max(pool) / max(raw)
    paired = statistics.median(p / r for p, r in zip(pool, raw, strict=True))
    print(f"trivial jobs, {WORKERS} workers, {rounds} paired rounds of {jobs:,} jobs")
    print(
        f"  raw trio pool   best {max(raw):>8,.0f} jobs/s   median {statistics.median(raw):>8,.0f}"
    )
    median_pool = statistics.median(pool)
    print(f"  worker_pool     best {max(pool):>8,.0f} jobs/s   median {median_pool:>8,.0f}")
    verdict = "meets" if min(best, paired) >= 0.85 else "misses"
    print(f"  ratio           best/best {best:.2f}x   median of pairs {paired:.2f}x")
    print(f"                  ({verdict} the 0.85x goal)")


# -- 2. SQLiteQueue throughput -----------------------------------------------------------------


async def timed(count: int, action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await action()
    return count / (time.perf_counter() - started)


async def sqlite_throughput(folder: Path) -> None:
    count = 300 if QUICK else 2_000
    batch = 2_000 if QUICK else 20_000
    # One caller, one operation at a time: nothing to group, so a commit each. The
    # queue against its peers, with concurrent callers: benchmarks/sqlite.py.
    print(f"SQLiteQueue ({count:,} operations per line, one at a time: a commit each)")
    for mode in MODES:
        path = folder / f"{mode.lower()}.db"
        async with SQLiteQueue(path, synchronous=mode) as queue:
            put = await timed(count, lambda: queue.put({"n": 1}))

            async def claim_ack() -> None:
                job = await queue.claim()
                assert job is not None
                await queue.ack(job)

            cycle = await timed(count, claim_ack)
            started = time.perf_counter()
            await queue.put_many([{"n": i} for i in range(batch)])
            many = batch / (time.perf_counter() - started)
        print(f"  synchronous={mode:<6}  put {put:>7,.0f}/s   claim+ack {cycle:>7,.0f} jobs/s")
        print(f"  {'':20} put_many (one transaction) {many:>9,.0f} jobs/s")

    jobs = 500 if QUICK else 3_000
    for mode in MODES:
        rate = await sqlite_pool_rate(folder / f"pool-{mode.lower()}.db", mode, jobs)
        print(f"  worker_pool over it, synchronous={mode:<6} {rate:>7,.0f} jobs/s (trivial jobs)")


async def sqlite_pool_rate(path: Path, mode: Literal["FULL", "NORMAL"], jobs: int) -> float:
    """worker_pool over an SQLiteQueue holding *jobs* trivial jobs: jobs/s until all acked."""
    finished = trio.Event()
    handled = 0

    async def handler(job: QueuedJob) -> None:
        nonlocal handled
        handled += 1
        if handled == jobs:
            finished.set()

    async with SQLiteQueue(path, synchronous=mode) as queue:
        await queue.put_many([{"n": i} for i in range(jobs)])
        sup = nd.Supervisor("bench")
        sup.add(nd.worker_pool(queue, handler, workers=WORKERS), name="pool")
        started = time.perf_counter()
        async with nd.open_supervisor(sup):
            await finished.wait()
        # Leaving the block drained the pool: the last acks are in.
        rate = jobs / (time.perf_counter() - started)
        assert (await queue.statistics()).done == jobs
    return rate


# -- 3. memory per in-flight job -----------------------------------------------------------------


def _abort(raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


async def _parked() -> None:
    """A task parked as cheaply as trio allows: the floor of any waiting task."""
    await trio.lowlevel.wait_task_rescheduled(_abort)


async def in_flight_bytes(count: int, kind: str) -> float:
    """Traced bytes per job with *count* jobs parked in flight, for one way of running them."""
    release = trio.Event()
    all_started = trio.Event()
    started = 0

    async def handler(job: Any) -> None:
        nonlocal started
        started += 1
        if started == count:
            all_started.set()
        await release.wait()

    queue = MemoryQueue()
    if kind == "pool":
        queue.put_many_nowait(range(count))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    async with trio.open_nursery() as nursery:
        if kind == "pool":
            sup = nd.Supervisor("bench")
            sup.add(nd.worker_pool(queue, handler, workers=count), name="pool")
            ready = trio.Event()

            async def run_supervisor() -> None:
                async with nd.open_supervisor(sup):
                    ready.set()
                    await release.wait()

            nursery.start_soon(run_supervisor)
            await ready.wait()
            await all_started.wait()
            assert sup.snapshot(max_jobs=0)["services"][0]["in_flight"] == count
        elif kind == "task per job, handler":
            for item in range(count):
                nursery.start_soon(handler, item)
        elif kind == "task per job, parked":
            for _ in range(count):
                nursery.start_soon(_parked)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        during = tracemalloc.get_traced_memory()[0]
        release.set()
        nursery.cancel_scope.cancel()  # ends the parked tasks
    tracemalloc.stop()
    return (during - before) / count


async def memory_per_job() -> None:
    count = 1_000 if QUICK else 10_000
    pool = await in_flight_bytes(count, "pool")
    with_handler = await in_flight_bytes(count, "task per job, handler")
    parked = await in_flight_bytes(count, "task per job, parked")
    # The handler's own: its coroutine and what its wait allocates (an Event.wait).
    handler_own = with_handler - parked
    print(f"memory with {count:,} jobs in flight (tracemalloc, bytes per job)")
    print(f"  worker_pool, everything                        {pool:>7,.0f}")
    print(f"  the handler's coroutine and its wait           {handler_own:>7,.0f}")
    print(f"  a trio task running the handler (task + above) {with_handler:>7,.0f}")
    for what, baseline in (
        ("beyond a trio task running the handler", with_handler),
        ("beyond the handler's coroutine alone", handler_own),
    ):
        extra = pool - baseline
        verdict = "meets" if extra <= 2048 else "misses"
        print(f"  worker_pool {what}: {extra:,.0f} ({extra / 1024:.2f} KiB, {verdict} <= 2 KiB)")


async def main() -> None:
    started = time.perf_counter()
    await compare_pools()
    print()
    with tempfile.TemporaryDirectory(prefix="nd-bench-") as folder:
        await sqlite_throughput(Path(folder))
    print()
    await memory_per_job()
    elapsed = time.perf_counter() - started
    print(f"\n({elapsed:.0f} s; Python {sys.version.split()[0]}, trio {trio.__version__})")


if __name__ == "__main__":
    trio.run(main)
