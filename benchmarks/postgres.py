"""PostgresQueue on a throwaway PostgreSQL server (fsync on), and pgqueuer on the same server.

1. Enqueue, jobs/s: ``put`` (one job a call, 20 concurrent callers) and ``put_many``
   (batches of 500).
2. Claim+ack, jobs/s: ``worker_pool`` with 20 workers over trivial jobs.
3. Put -> claim: from the call of ``put`` to an idle worker's ``claim`` returning
   (another queue object does the put, as another process would), p50 and p99.
4. SIGKILL -> rerun: a worker process holds 4 jobs and is SIGKILLed; the time until
   this process, the rest of the fleet, has claimed all four again.

The peer, pgqueuer (asyncio, asyncpg; its default, fully logged tables), runs the same
enqueue and 20-job-concurrency consume in a virtual environment of its own under
``~/.cache/nursery-down/bench-peers`` (installed with pip on first use; reported as
skipped when it cannot be installed). It is never a dependency of nursery_down.

Figures 1 and 2 are measured in three rounds, each of PostgresQueue then pgqueuer on
fresh databases, and reported as the median and range of the rounds: on a shared
machine the load moves within a minute, and alternating keeps either side from
having all the quiet (or busy) stretches.

The server is a fresh cluster from the Debian packages (nursery_down.testing.start_postgres),
or the one ``NURSERY_DOWN_TEST_POSTGRES`` names. Run: ``python benchmarks/postgres.py``
(about two minutes; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

import nursery_down as nd
from nursery_down.queues import PostgresQueue, QueuedJob
from nursery_down.testing import NoPostgresError, remove_postgres, start_postgres

ROOT = Path(__file__).resolve().parent.parent
QUICK = "--quick" in sys.argv
WORKERS = 20
JOBS = 2_000 if QUICK else 10_000
PUTS = 1_000 if QUICK else 5_000
LATENCY_SAMPLES = 30 if QUICK else 200
KILLS = 1 if QUICK else 3
ROUNDS = 1 if QUICK else 3
PEERS = Path.home() / ".cache" / "nursery-down" / "bench-peers"


async def trivial(job: QueuedJob) -> None:
    """The job of the throughput rounds: nothing at all."""


# -- 1. and 2. throughput ------------------------------------------------------------------


async def enqueue_rates(dsn: str) -> tuple[float, float]:
    """(jobs/s of single puts by 20 concurrent callers, jobs/s of put_many batches of 500)."""
    async with PostgresQueue(dsn, name="bench_put", pool_size=WORKERS) as queue:
        await queue.put(0)
        per_caller = PUTS // WORKERS

        async def caller() -> None:
            for i in range(per_caller):
                await queue.put({"n": i})

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(caller)
        single = per_caller * WORKERS / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(JOBS // 500):
            await queue.put_many([{"n": i} for i in range(500)])
        batch = (JOBS // 500) * 500 / (time.perf_counter() - started)
    return single, batch


async def claim_ack_rate(dsn: str) -> float:
    """Jobs/s of a 20-worker pool over trivial jobs, all queued before it starts."""
    async with PostgresQueue(dsn, name="bench_pool") as queue:
        for _ in range(JOBS // 1000):
            await queue.put_many([None] * 1000)
        total = (JOBS // 1000) * 1000
        done = 0
        all_done = trio.Event()

        async def count(job: QueuedJob) -> None:
            nonlocal done
            done += 1
            if done == total:
                all_done.set()

        sup = nd.Supervisor("bench")
        sup.add(nd.worker_pool(queue, count, workers=WORKERS), name="pool")
        started = time.perf_counter()
        async with nd.open_supervisor(sup):
            await all_done.wait()
            # Until the last acks are written: the pool writes them behind its workers.
            await sup.drain()
            await sup.wait_finished()
            elapsed = time.perf_counter() - started
        assert (await queue.statistics()).done == total
    return total / elapsed


# -- 3. put -> claim --------------------------------------------------------------------------


async def put_to_claim(dsn: str) -> list[float]:
    """Seconds from each put's call to the idle worker's claim returning."""
    delays: list[float] = []
    async with (
        PostgresQueue(dsn, name="bench_latency", poll_interval=60.0) as worker,
        PostgresQueue(dsn, name="bench_latency") as producer,
    ):
        await worker.statistics()
        put_at = [0.0]

        async def claim_one() -> None:
            job = await worker.claim()
            delays.append(time.perf_counter() - put_at[0])
            assert job is not None
            await worker.ack(job)

        for _ in range(LATENCY_SAMPLES):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(claim_one)
                # Let the claim find the queue empty and wait for the NOTIFY.
                await trio.sleep(0.02)
                put_at[0] = time.perf_counter()
                await producer.put(None)
    return delays


# -- 4. SIGKILL -> rerun ----------------------------------------------------------------------


def worker_main(dsn: str) -> None:
    """The process that is killed: a pool of 4 workers whose jobs run for an hour."""

    async def hang(job: QueuedJob) -> None:
        await trio.sleep(3600)

    sup = nd.Supervisor("bench-victim")
    sup.add(nd.worker_pool(PostgresQueue(dsn, name="bench_kill"), hang, workers=4), name="pool")
    raise SystemExit(nd.run(sup))


async def kill_to_rerun(dsn: str) -> list[float]:
    """Seconds from a worker's SIGKILL to this process having claimed its 4 jobs again."""
    times: list[float] = []
    async with PostgresQueue(dsn, name="bench_kill") as fleet:
        for _ in range(KILLS):
            await fleet.put_many([None] * 4)
            victim = await trio.lowlevel.open_process(
                [sys.executable, __file__, "--worker", dsn],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                with trio.fail_after(60):
                    # Polling the database: the victim holds all four once it shows them.
                    while True:
                        if (await fleet.statistics()).leased == 4:
                            break
                        await trio.sleep(0.01)
            finally:
                victim.send_signal(signal.SIGKILL)
                killed_at = time.perf_counter()
                await victim.wait()
            with trio.fail_after(60):
                jobs = [await fleet.claim() for _ in range(4)]
            times.append(time.perf_counter() - killed_at)
            for job in jobs:
                assert job is not None
                await fleet.ack(job)
    return times


# -- the peer ---------------------------------------------------------------------------------

PGQUEUER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import asyncpg
    from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, QueueManager, Queries
    from pgqueuer.types import QueueExecutionMode

    DSN, JOBS, PUTS, WORKERS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    async def main():
        connection = await asyncpg.connect(DSN)
        queries = Queries(AsyncpgDriver(connection))
        await queries.install()
        pool = await asyncpg.create_pool(DSN, min_size=WORKERS, max_size=WORKERS)
        pooled = Queries(AsyncpgPoolDriver(pool))
        per_caller = PUTS // WORKERS

        async def caller():
            for _ in range(per_caller):
                await pooled.enqueue("bench", None)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(WORKERS)))
        single = per_caller * WORKERS / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(JOBS // 500):
            await queries.enqueue(["bench"] * 500, [None] * 500, [0] * 500)
        batch = (JOBS // 500) * 500 / (time.perf_counter() - started)
        total = per_caller * WORKERS + (JOBS // 500) * 500
        await pool.close()

        manager = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(DSN))))
        done = 0

        @manager.entrypoint("bench")
        async def bench(job):
            nonlocal done
            done += 1

        started = time.perf_counter()
        await manager.run(
            batch_size=10, max_concurrent_tasks=WORKERS, mode=QueueExecutionMode.drain
        )
        consume = done / (time.perf_counter() - started)
        print(json.dumps({"single": single, "batch": batch, "consume": consume,
                          "done": done, "total": total}))

    asyncio.run(main())
    """
)


def pgqueuer_python() -> tuple[Path | None, str]:
    """The Python of pgqueuer's own environment (created on first use), or None and why."""
    venv = PEERS / "pgqueuer"
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if made.returncode:
            return None, f"cannot create a virtual environment: {made.stderr.strip()[-300:]}"
    ready = subprocess.run(
        [str(python), "-c", "import pgqueuer, asyncpg; print(pgqueuer.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if ready.returncode:
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "pgqueuer", "asyncpg"],
            capture_output=True,
            text=True,
            check=False,
        )
        if installed.returncode:
            return None, f"pip install pgqueuer failed: {installed.stderr.strip()[-300:]}"
        ready = subprocess.run(
            [str(python), "-c", "import pgqueuer; print(pgqueuer.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
    return python, ready.stdout.strip()


def run_pgqueuer(dsn: str) -> dict[str, float] | str:
    """pgqueuer's figures, or why they are missing."""
    python, version = pgqueuer_python()
    if python is None:
        return version
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    # asyncpg reads URLs only.
    url = (
        f"postgresql://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}:"
        f"{parts.get('port', 5432)}/{parts['dbname']}"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(PGQUEUER_SCRIPT)
    try:
        result = subprocess.run(
            [str(python), script.name, url, str(JOBS), str(PUTS), str(WORKERS)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        os.unlink(script.name)
    if result.returncode:
        return f"pgqueuer {version} failed: {result.stderr.strip()[-500:]}"
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"pgqueuer {version}: {figures['done']:.0f} of {figures['total']:.0f} jobs consumed")
    return figures


# -- the report ---------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    try:
        server = start_postgres(fsync=True)
    except NoPostgresError as exc:
        print(f"skipped: {exc}")
        return 0
    keys = ("single", "batch", "consume")
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    peer_skipped = ""
    load_before = os.getloadavg()[0]
    try:
        [(fsync,)] = _query(server.create_database(), "SHOW fsync")
        print(
            f"PostgreSQL at {server.dsn} (fsync={fsync}), {WORKERS} workers, {JOBS} jobs, "
            f"{ROUNDS} round{'s' if ROUNDS > 1 else ''}\n"
        )
        for _ in range(ROUNDS):
            ours_dsn, peer_dsn = server.create_database(), server.create_database()
            single, batch = trio.run(enqueue_rates, ours_dsn)
            consume = trio.run(claim_ack_rate, ours_dsn)
            ours.append({"single": single, "batch": batch, "consume": consume})
            if not peer_skipped:
                peer = run_pgqueuer(peer_dsn)
                if isinstance(peer, dict):
                    theirs.append(peer)
                else:
                    peer_skipped = peer
        latency_dsn = server.create_database()
        delays = trio.run(put_to_claim, latency_dsn)
        kills = trio.run(kill_to_rerun, latency_dsn)
    finally:
        remove_postgres(server)
    print(f"\n{'jobs/s, median (range) of the rounds':<38}{'PostgresQueue':>24}{'pgqueuer':>24}")
    labels = {
        "single": "enqueue, one job a call (20 callers)",
        "batch": "enqueue, batches of 500",
        "consume": "claim+ack, 20 workers",
    }
    for key in keys:
        line = f"{labels[key]:<38}{_spread([r[key] for r in ours]):>24}"
        if theirs:
            line += f"{_spread([r[key] for r in theirs]):>24}"
            ahead = sum(o[key] > t[key] for o, t in zip(ours, theirs, strict=False))
            line += f"   ahead in {ahead} of {min(len(ours), len(theirs))}"
        else:
            line += f"{'skipped':>24}"
        print(line)
    if peer_skipped:
        print(f"pgqueuer skipped: {peer_skipped}")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(
        f"\nput -> claim by an idle worker: p50 {percentile(delays, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(delays, 0.99) * 1000:.1f} ms ({len(delays)} puts)"
    )
    print(
        "SIGKILL -> its 4 jobs claimed again: "
        + ", ".join(f"{t:.2f} s" for t in kills)
        + f" (median {statistics.median(kills):.2f} s)"
    )
    return 0


def _spread(values: list[float]) -> str:
    """``median (low-high)`` of the rounds' figures, or the one figure of a single round."""
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def _query(dsn: str, text: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn) as connection:
        return connection.execute(text).fetchall()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2])
    else:
        sys.path.insert(0, str(ROOT))
        raise SystemExit(main())
