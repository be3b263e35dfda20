"""Real processes, real signals: the SQLite queue loses no job, whenever the worker dies.

Each test fills a queue file, then runs ``tests/programs/queue_target.py`` through
``nursery-down run`` again and again, signalling it at random instants, until the
queue is empty; then it reads the ledger (each handler's completions), the queue's
``history`` and ``dead_letters`` tables, and checks what the queue promises:

- SIGKILL: nothing lost; a job runs twice only if it was in flight at a kill;
  orphaned leases are requeued within 5 s of the restart; exactly the poison jobs
  are dead-lettered.
- SIGTERM: nothing lost, nothing run twice, every run exits 0.

The instants are random; set ``NURSERY_DOWN_SIGNAL_SEED`` to replay the seed a
failure reports.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from nursery_down.queues import SQLiteQueue

pytestmark = pytest.mark.subprocess

PROGRAM = Path(__file__).resolve().parent / "programs" / "queue_target.py"
CLI = Path(sys.executable).with_name("nursery-down")
SEED = int(os.environ.get("NURSERY_DOWN_SIGNAL_SEED") or random.randrange(2**32))
JOBS = 300
POISON = 2
#: Every wait for a program has this bound, so a hang fails instead of stalling.
PATIENCE = 30.0
#: Orphaned leases must be requeued this soon after the restart.
RECOVERY_LIMIT = 5.0
#: This many runs in a row that settle no job: the queue is not draining. (Counted in
#: runs without progress, not in runs: a slow machine needs more runs, not fewer jobs.)
STALLED_RUNS = 20


@dataclass
class Run:
    """One run of the target program."""

    process: subprocess.Popen[bytes]
    started: float  # time.time() just before it was started
    output: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_exit(self) -> int:
        try:
            return self.process.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} still running {PATIENCE} s later") from None

    def describe(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]


class Harness:
    """A queue file, a ledger, and the runs of the target program that use them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.db = directory / "jobs.db"
        self.ledger = directory / "ledger"
        self.runs: list[Run] = []

    def fill(self, rng: random.Random) -> tuple[set[int], set[int]]:
        """Put JOBS jobs of 20-50 ms, POISON of them poison; return (good ids, poison ids)."""
        poison_at = set(rng.sample(range(JOBS), POISON))
        payloads = [{"ms": rng.randint(20, 50), "poison": i in poison_at} for i in range(JOBS)]

        async def put() -> list[int]:
            async with SQLiteQueue(self.db) as queue:
                return await queue.put_many(payloads)

        ids = trio.run(put)
        poison = {job_id for job_id, p in zip(ids, payloads, strict=True) if p["poison"]}
        return set(ids) - poison, poison

    def start(self) -> Run:
        env = dict(os.environ)
        env.update(QUEUE_TARGET_DB=str(self.db), QUEUE_TARGET_LEDGER=str(self.ledger))
        output = self.directory / f"output-{len(self.runs)}"
        started = time.time()
        with open(output, "wb") as sink:
            process = subprocess.Popen(
                [str(CLI), "run", f"{PROGRAM}:sup", "--no-dashboard"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        run = Run(process, started, output)
        self.runs.append(run)
        return run

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        connection = sqlite3.connect(self.db)
        try:
            return list(connection.execute(sql, args))
        finally:
            connection.close()

    def counts(self) -> dict[str, int]:
        counts = {"queued": 0, "leased": 0}
        counts.update({str(s): int(str(n)) for s, n in self.query(_COUNT_BY_STATE)})
        return counts

    def leased_by(self, pid: int) -> set[int]:
        return {int(str(row[0])) for row in self.query(_LEASED_BY, pid)}

    def completions(self) -> collections.Counter[int]:
        counter: collections.Counter[int] = collections.Counter()
        for line in self.ledger.read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "done":
                counter[int(fields[1])] += 1
        return counter

    def wait_up(self, run: Run) -> float:
        """Wait until *run* wrote its ``up`` line; return when."""
        deadline = time.monotonic() + PATIENCE
        while True:
            if self.ledger.exists():
                for line in self.ledger.read_text().splitlines():
                    fields = line.split()
                    if fields[:2] == ["up", str(run.pid)]:
                        return float(fields[2])
            assert run.process.poll() is None, f"pid {run.pid} exited early:\n{run.describe()}"
            assert time.monotonic() < deadline, f"pid {run.pid} never came up"
            time.sleep(0.01)

    def wait_working(self, run: Run) -> None:
        """Wait until *run* holds a lease (a job in flight), or nothing is left to lease."""
        deadline = time.monotonic() + PATIENCE
        while not self.leased_by(run.pid) and self.counts()["queued"]:
            assert run.process.poll() is None, f"pid {run.pid} exited early:\n{run.describe()}"
            assert time.monotonic() < deadline, f"pid {run.pid} took no job in {PATIENCE} s"
            time.sleep(0.01)

    def settled(self) -> int:
        """Jobs done or dead-lettered so far: what the runs have got through."""
        (done,) = self.query("SELECT value FROM counters WHERE name = 'done'")
        (dead,) = self.query("SELECT count(*) FROM dead_letters")
        return int(str(done[0])) + int(str(dead[0]))

    def wait_empty(self, run: Run) -> None:
        deadline = time.monotonic() + PATIENCE
        while self.counts() != {"queued": 0, "leased": 0}:
            assert run.process.poll() is None, f"pid {run.pid} exited early:\n{run.describe()}"
            assert time.monotonic() < deadline, f"queue not empty after {PATIENCE} s"
            time.sleep(0.02)

    def stop_all(self) -> None:
        for run in self.runs:
            if run.process.poll() is None:
                run.process.kill()
            run.process.wait(timeout=PATIENCE)


_COUNT_BY_STATE = "SELECT state, count(*) FROM jobs GROUP BY state"
_LEASED_BY = "SELECT id FROM jobs WHERE state = 'leased' AND lease_pid = ?"


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.stop_all()


def check_outcome(harness: Harness, good: set[int], poison: set[int], seed: int) -> None:
    """Nothing lost: every good job completed and acked once, every poison job dead."""
    where = f"(seed {seed})"
    completions = harness.completions()
    lost = good - set(completions)
    assert not lost, f"jobs never completed {where}: {sorted(lost)}"
    assert not set(completions) & poison, f"a poison job completed {where}"
    assert harness.counts() == {"queued": 0, "leased": 0}, where
    dead = {int(str(row[0])) for row in harness.query("SELECT id FROM dead_letters")}
    assert dead == poison, f"dead letters {sorted(dead)} are not the poison jobs {where}"
    acks = collections.Counter(
        int(str(row[0])) for row in harness.query("SELECT job_id FROM history WHERE event = 'ack'")
    )
    assert set(acks) == good, where
    assert set(acks.values()) == {1}, f"a job was acked twice {where}"
    done = harness.query("SELECT value FROM counters WHERE name = 'done'")
    assert done == [(len(good),)], where


def test_sigkill_at_random_instants_loses_no_job(harness: Harness) -> None:
    seed = SEED
    rng = random.Random(seed)
    good, poison = harness.fill(rng)
    # For each kill: the jobs the killed process held (in flight, or claimed and
    # about to start) and the run that came after it.
    orphans_of_kill: list[tuple[set[int], int]] = []
    kills = 0
    # Runs in a row that got no job through: how a queue that stopped draining shows.
    fruitless = 0
    while kills < 10 or harness.counts()["queued"]:
        assert fruitless < STALLED_RUNS, f"the queue is not draining (seed {seed})"
        before = harness.settled()
        run = harness.start()
        if kills % 2:
            # Into the work, however long the start-up took: a random instant after
            # the run took its first job.
            harness.wait_working(run)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            # Anywhere from during start-up on: a random instant after the spawn.
            time.sleep(rng.uniform(0.1, 0.9))
        if run.process.poll() is not None:
            raise AssertionError(f"pid {run.pid} exited by itself:\n{run.describe()}")
        run.process.send_signal(signal.SIGKILL)
        assert run.wait_exit() == -signal.SIGKILL
        kills += 1
        orphans_of_kill.append((harness.leased_by(run.pid), len(harness.runs)))
        fruitless = 0 if harness.settled() > before else fruitless + 1
    final = harness.start()
    harness.wait_up(final)
    harness.wait_empty(final)
    final.process.send_signal(signal.SIGTERM)
    assert final.wait_exit() == 0, final.describe()

    check_outcome(harness, good, poison, seed)
    in_flight_at_a_kill = set().union(*(orphans for orphans, _ in orphans_of_kill))
    duplicates = {job for job, n in harness.completions().items() if n > 1}
    assert duplicates <= in_flight_at_a_kill, (
        f"jobs run twice that no kill interrupted (seed {seed}): "
        f"{sorted(duplicates - in_flight_at_a_kill)}"
    )
    assert any(orphans for orphans, _ in orphans_of_kill), f"no kill hit a job (seed {seed})"

    # Orphans were requeued by the first later run that opened the queue, soon after it started.
    recovered = {
        int(str(job)): (float(str(stamp)), int(str(pid)))
        for job, stamp, pid in harness.query(
            "SELECT job_id, max(time), pid FROM history WHERE event = 'recover' GROUP BY job_id"
        )
    }
    started_at = {run.pid: run.started for run in harness.runs}
    for orphans, _next_run in orphans_of_kill:
        for job in orphans:
            assert job in recovered, f"orphan {job} never requeued (seed {seed})"
            stamp, pid = recovered[job]
            delay = stamp - started_at[pid]
            assert delay < RECOVERY_LIMIT, (
                f"orphan {job} requeued {delay:.2f} s after its restart (seed {seed})"
            )


def test_sigterm_at_random_instants_loses_and_repeats_nothing(harness: Harness) -> None:
    seed = SEED + 1
    rng = random.Random(seed)
    good, poison = harness.fill(rng)
    terms = 0
    fruitless = 0  # runs in a row that got no job through
    while harness.counts()["queued"] or terms < 3:
        assert fruitless < STALLED_RUNS, f"the queue is not draining (seed {seed})"
        before = harness.settled()
        run = harness.start()
        up = harness.wait_up(run)
        time.sleep(max(0.0, up + rng.uniform(0.0, 0.6) - time.time()))
        run.process.send_signal(signal.SIGTERM)
        assert run.wait_exit() == 0, run.describe()
        terms += 1
        # A clean drain leaves no lease behind: running jobs were acked, held ones released.
        assert harness.leased_by(run.pid) == set(), f"seed {seed}"
        fruitless = 0 if harness.settled() > before else fruitless + 1
    check_outcome(harness, good, poison, seed)
    repeated = {job for job, n in harness.completions().items() if n > 1}
    assert not repeated, f"jobs run twice after SIGTERM (seed {seed}): {sorted(repeated)}"
    assert not harness.query("SELECT 1 FROM history WHERE event = 'recover'"), f"seed {seed}"
