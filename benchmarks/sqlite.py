"""SQLiteQueue against the embedded queues one would pick instead: huey, persist-queue, litequeue.

Every queue in one run, on files in a fresh temporary folder each round (it must be on a
real disk: on tmpfs an fsync costs nothing; the script prints the file system), WAL
journal, first at ``synchronous=FULL``, then at ``NORMAL``. 20 workers, trivial jobs:

1. Enqueue, jobs/s: 5,000 jobs put one at a time by 20 concurrent producers. nursery_down:
   20 trio tasks awaiting ``put`` on one ``SQLiteQueue``; the peers: 20 threads.
2. Claim+run+ack, jobs/s: the jobs of 1., all queued before the consumers start, until
   the last is done. nursery_down: ``worker_pool(queue, handler, workers=20)`` under a
   ``Supervisor`` (``nd.open_supervisor``), on a new queue object on the same file; the
   handler counts, and at the last job the supervisor is drained, so the time includes
   the drain and the last acks. The peers: 20 threads (huey: its consumer's).
3. Put -> claim, nursery_down only: 200 puts, each from the moment ``put`` is called to
   the handler of an idle ``worker_pool`` (20 workers) starting on it, p50 and p99; once
   with the put made by the same queue object the pool claims from (an enqueue in the
   worker's own process) and once by another ``SQLiteQueue`` object on the same file, as
   another process would (seen within ``poll_interval``, 0.1 s by default; the puts come
   at random moments of that interval).
4. Ack as seen by the caller, nursery_down only: the time of each ``ack`` call, wrapped in
   a subclass whose ``ack`` times ``super().ack``, p50 and p99: under load (the pool of 2.)
   and on an idle queue (the pool of 3.).

Each figure is measured in every round (``--rounds 3`` by default; the queues take turns
within a round) and printed as min-max over the rounds; the nursery_down/huey ratio is
taken per round. Each job carries its number, so a queue that lost or ran a job twice
is reported.

The peers run in virtual environments of their own under
``~/.cache/nursery-down/bench-peers`` (created and installed with pip on first use; a peer
that cannot be installed or fails is printed as skipped, with the reason), each round as
a subprocess printing JSON. None is a dependency of nursery_down. Their durability:

- huey: ``SqliteHuey`` (``journal_mode="wal"``, its default) and its consumer with 20
  thread workers (``worker_type="thread"``, periodic tasks off). Its storage class is
  subclassed so that each new connection runs ``PRAGMA synchronous=<mode>`` (its own
  ``fsync=True`` option means FULL; it has none for NORMAL). Huey deletes a task when
  it dequeues it (at most once): there is no ack.
- persist-queue: one ``SQLiteAckQueue(path, multithreading=True)`` shared by the 20
  threads; it opens its two connections (gets; puts and acks) in WAL, and the script
  runs ``PRAGMA synchronous=<mode>`` on both. ``get(block=False, raw=True)`` and
  ``ack(id=...)``.
- litequeue: one ``LiteQueue`` per thread on the same file (one instance cannot be shared
  by threads: its ``pop`` opens a transaction on its single connection). It opens WAL
  and sets ``synchronous=NORMAL`` itself; the script then runs ``PRAGMA
  synchronous=<mode>`` on each connection. ``pop()`` and ``done(message_id)``; a
  "database is locked" error (more than 5 s waiting for the write lock) is retried and
  counted.

Each peer reads its setting back and the script checks it. Run:
``python benchmarks/sqlite.py`` (about 4 minutes on 2 cores; ``--quick``, about 45 s, for
1,000 jobs and 40 latency samples; ``--rounds N`` for N rounds).
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

import nursery_down as nd
from nursery_down.queues import QueuedJob, SQLiteQueue

QUICK = "--quick" in sys.argv
WORKERS = 20
JOBS = 1_000 if QUICK else 5_000
LATENCY_SAMPLES = 40 if QUICK else 200
PEERS = Path.home() / ".cache" / "nursery-down" / "bench-peers"
Mode = Literal["FULL", "NORMAL"]
MODES: tuple[Mode, ...] = ("FULL", "NORMAL")
SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def rounds_wanted() -> int:
    """``--rounds N`` (default 3)."""
    if "--rounds" in sys.argv:
        return max(1, int(sys.argv[sys.argv.index("--rounds") + 1]))
    return 3


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class TimedAckQueue(SQLiteQueue):
    """An SQLiteQueue whose ``ack`` records how long each call took, as its caller sees it."""

    def __init__(self, path: Path, synchronous: Mode) -> None:
        super().__init__(path, synchronous=synchronous)
        self.ack_seconds: list[float] = []

    async def ack(self, job: QueuedJob) -> None:
        started = time.perf_counter()
        await super().ack(job)
        self.ack_seconds.append(time.perf_counter() - started)


@dataclass
class Figures:
    """One queue's figures in one round at one durability setting."""

    put: float = 0.0
    consume: float = 0.0
    done: int = 0
    duplicates: int = 0
    missing: int = 0
    left: int = 0
    busy_retries: int = 0
    #: Seconds, nursery_down only.
    latency: dict[str, list[float]] = field(default_factory=dict)


def checked_counts(seen: list[int], jobs: int) -> tuple[int, int, int]:
    """(jobs run, jobs run more than once beyond the first, jobs never run) of 0..jobs-1."""
    counts = Counter(seen)
    duplicates = sum(count - 1 for count in counts.values() if count > 1)
    missing = sum(1 for n in range(jobs) if n not in counts)
    return len(seen), duplicates, missing


# -- nursery_down ------------------------------------------------------------------------------


async def ours_throughput(path: Path, mode: Mode, jobs: int = JOBS) -> Figures:
    """Figures 1 and 2 (and the acks under load) for one SQLiteQueue file."""
    figures = Figures()
    async with SQLiteQueue(path, synchronous=mode) as producer:
        per_producer = jobs // WORKERS

        async def produce(first: int) -> None:
            for n in range(first, first + per_producer):
                await producer.put({"n": n})

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(WORKERS):
                nursery.start_soon(produce, i * per_producer)
        figures.put = per_producer * WORKERS / (time.perf_counter() - started)
    total = per_producer * WORKERS

    seen: list[int] = []
    all_done = trio.Event()

    async def handler(job: QueuedJob) -> None:
        seen.append(job.payload["n"])
        if len(seen) == total:
            all_done.set()

    queue = TimedAckQueue(path, mode)
    async with queue:
        sup = nd.Supervisor("bench")
        sup.add(nd.worker_pool(queue, handler, workers=WORKERS), name="pool")
        started = time.perf_counter()
        async with nd.open_supervisor(sup):
            with trio.move_on_after(600):
                await all_done.wait()
            await sup.drain()
        # Leaving the block waited for the drain: the last acks are in.
        figures.consume = len(seen) / (time.perf_counter() - started)
        stats = await queue.statistics()
        figures.left = stats.queued + stats.leased
        figures.latency["ack under load"] = queue.ack_seconds
    figures.done, figures.duplicates, figures.missing = checked_counts(seen, total)
    if stats.done != len(seen):
        print(f"  (statistics().done is {stats.done} after {len(seen)} jobs run)")
    return figures


async def put_to_claim(
    path: Path, mode: Mode, other_object: bool
) -> tuple[list[float], list[float]]:
    """(seconds from each put's call to its handler starting, seconds of each idle ack)."""
    delays: list[float] = []
    put_at = [0.0]
    got = trio.Event()
    rng = random.Random(17)

    async def handler(job: QueuedJob) -> None:
        delays.append(time.perf_counter() - put_at[0])
        got.set()

    async with AsyncExitStack() as stack:
        queue = TimedAckQueue(path, mode)
        await stack.enter_async_context(queue)
        producer: SQLiteQueue = queue
        if other_object:
            producer = await stack.enter_async_context(SQLiteQueue(path, synchronous=mode))
        sup = nd.Supervisor("bench")
        sup.add(nd.worker_pool(queue, handler, workers=WORKERS), name="pool")
        async with nd.open_supervisor(sup):
            for _ in range(LATENCY_SAMPLES):
                # Idle again (the last ack in, the pool waiting for work), and for
                # another object's puts a random moment of the claim's poll interval.
                wait = queue.poll_interval if other_object else 0.01
                await trio.sleep(0.005 + rng.uniform(0, wait))
                got = trio.Event()
                put_at[0] = time.perf_counter()
                await producer.put(None)
                with trio.fail_after(30):
                    await got.wait()
            await sup.drain()
    return delays, queue.ack_seconds


async def ours_round(folder: Path, mode: Mode) -> Figures:
    figures = await ours_throughput(folder / "throughput.db", mode)
    same, idle_acks = await put_to_claim(folder / "latency-same.db", mode, other_object=False)
    other, more_idle_acks = await put_to_claim(folder / "latency-other.db", mode, other_object=True)
    figures.latency["put -> claim, same object"] = same
    figures.latency["put -> claim, other object"] = other
    figures.latency["ack, idle queue"] = idle_acks + more_idle_acks
    return figures


# -- the peers -------------------------------------------------------------------------------

# The part every peer's script shares: arguments, 20 threads at once, the JSON report.
PEER_COMMON = textwrap.dedent(
    """
    import json, sqlite3, sys, threading, time
    from importlib.metadata import version

    FOLDER, MODE, JOBS, WORKERS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    PER_THREAD = JOBS // WORKERS
    TOTAL = PER_THREAD * WORKERS
    seen = []
    seen_lock = threading.Lock()
    errors = []

    def in_threads(target):
        \"\"\"target(i) in WORKERS threads started together: seconds until the last ends.\"\"\"
        barrier = threading.Barrier(WORKERS + 1)

        def run(i):
            barrier.wait()
            try:
                target(i)
            except BaseException as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(WORKERS)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    def numbers(i):
        return range(i * PER_THREAD, (i + 1) * PER_THREAD)

    def record(n):
        with seen_lock:
            seen.append(n)
            return len(seen)

    def report(package, put_seconds, consume_seconds, synchronous, journal, left, **extra):
        print(json.dumps(dict(
            version=version(package), put=TOTAL / put_seconds,
            consume=len(seen) / consume_seconds, seen=seen, total=TOTAL,
            synchronous=synchronous, journal=journal, left=left, errors=errors[:3],
            **extra)))
    """
)

HUEY_SCRIPT = textwrap.dedent(
    """
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class Storage(SqliteStorage):
        def _create_connection(self):
            connection = super()._create_connection()
            connection.execute(f"pragma synchronous={MODE}")
            return connection

    class BenchHuey(SqliteHuey):
        storage_class = Storage

    huey = BenchHuey("bench", filename=f"{FOLDER}/huey.db", journal_mode="wal")
    finished = threading.Event()

    @huey.task()
    def job(n):
        if record(n) == TOTAL:
            finished.set()

    def produce(i):
        for n in numbers(i):
            job(n)

    put_seconds = in_threads(produce)
    consumer = huey.create_consumer(
        workers=WORKERS, worker_type="thread", periodic=False, check_worker_health=False
    )
    started = time.perf_counter()
    consumer.start()
    finished.wait(600)
    consume_seconds = time.perf_counter() - started
    consumer.stop(graceful=True)
    [(synchronous,)] = huey.storage.sql("pragma synchronous", results=True)
    [(journal,)] = huey.storage.sql("pragma journal_mode", results=True)
    report("huey", put_seconds, consume_seconds, synchronous, journal,
           huey.storage.queue_size())
    """
)

PERSIST_QUEUE_SCRIPT = textwrap.dedent(
    """
    from persistqueue import SQLiteAckQueue
    from persistqueue.exceptions import Empty

    queue = SQLiteAckQueue(f"{FOLDER}/persist-queue", multithreading=True)
    connections = [queue._getter, queue._putter]
    for connection in connections:
        connection.execute(f"PRAGMA synchronous={MODE}")

    def produce(i):
        for n in numbers(i):
            queue.put(n)

    def consume(i):
        while True:
            try:
                item = queue.get(block=False, raw=True)
            except Empty:
                return
            record(item["data"])
            queue.ack(id=item["pqid"])

    put_seconds = in_threads(produce)
    consume_seconds = in_threads(consume)
    settings = {c.execute("PRAGMA synchronous").fetchone()[0] for c in connections}
    [journal] = {c.execute("PRAGMA journal_mode").fetchone()[0] for c in connections}
    report("persist-queue", put_seconds, consume_seconds,
           settings.pop() if len(settings) == 1 else -1, journal,
           queue.ready_count() + queue.unack_count())
    """
)

LITEQUEUE_SCRIPT = textwrap.dedent(
    """
    from litequeue import LiteQueue, MessageStatus

    queues = [LiteQueue(f"{FOLDER}/litequeue.db") for _ in range(WORKERS)]
    for queue in queues:
        queue.conn.execute(f"PRAGMA synchronous={MODE}")
    busy = [0]

    def retried(call, *args):
        while True:
            try:
                return call(*args)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                busy[0] += 1

    def produce(i):
        for n in numbers(i):
            retried(queues[i].put, str(n))

    def consume(i):
        while True:
            message = retried(queues[i].pop)
            if message is None:
                return
            record(int(message.data))
            retried(queues[i].done, message.message_id)

    put_seconds = in_threads(produce)
    consume_seconds = in_threads(consume)
    settings = {q.conn.execute("PRAGMA synchronous").fetchone()[0] for q in queues}
    [journal] = {q.conn.execute("PRAGMA journal_mode").fetchone()[0] for q in queues}
    [(left,)] = queues[0].conn.execute(
        f"SELECT count(*) FROM Queue WHERE status != {MessageStatus.DONE.value}"
    ).fetchall()
    report("litequeue", put_seconds, consume_seconds,
           settings.pop() if len(settings) == 1 else -1, journal, left, busy_retries=busy[0])
    """
)


@dataclass(frozen=True)
class Peer:
    name: str
    #: What pip installs, and a module whose import shows it is installed.
    requirement: str
    module: str
    script: str


PEER_LIST = (
    Peer("huey", "huey", "huey", HUEY_SCRIPT),
    Peer("persist-queue", "persist-queue", "persistqueue", PERSIST_QUEUE_SCRIPT),
    Peer("litequeue", "litequeue", "litequeue", LITEQUEUE_SCRIPT),
)


def peer_python(peer: Peer) -> tuple[Path | None, str]:
    """The Python of the peer's own environment (created on first use), or None and why."""
    venv = PEERS / peer.name
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if made.returncode:
            return None, f"cannot create a virtual environment: {made.stderr.strip()[-300:]}"
    check = f"import {peer.module}; from importlib.metadata import version; "
    check += f"print(version({peer.requirement!r}))"
    ready = subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=False)
    if ready.returncode:
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", peer.requirement],
            capture_output=True,
            text=True,
            check=False,
        )
        if installed.returncode:
            return None, f"pip install {peer.requirement} failed: {installed.stderr.strip()[-300:]}"
        ready = subprocess.run(
            [str(python), "-c", check], capture_output=True, text=True, check=False
        )
        if ready.returncode:
            return None, f"{peer.module} does not import: {ready.stderr.strip()[-300:]}"
    return python, ready.stdout.strip()


def run_peer(python: Path, peer: Peer, folder: Path, mode: Mode) -> Figures | str:
    """The peer's figures 1 and 2 in one round, or why they are missing."""
    folder.mkdir()
    script = folder / f"bench_{peer.module}.py"
    script.write_text(PEER_COMMON + peer.script)
    try:
        result = subprocess.run(
            [str(python), str(script), str(folder), mode, str(JOBS), str(WORKERS)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=folder,
        )
    except subprocess.TimeoutExpired:
        return "no result within 900 s"
    if result.returncode:
        return f"exit {result.returncode}: {result.stderr.strip()[-500:]}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    if report["errors"]:
        return "failed in a thread: " + "; ".join(report["errors"])
    got = SYNCHRONOUS.get(report["synchronous"], str(report["synchronous"]))
    if got != mode or report["journal"].lower() != "wal":
        return f"ran with synchronous={got}, journal_mode={report['journal']}, not {mode}/wal"
    figures = Figures(put=report["put"], consume=report["consume"], left=report["left"])
    figures.busy_retries = report.get("busy_retries", 0)
    figures.done, figures.duplicates, figures.missing = checked_counts(
        report["seen"], report["total"]
    )
    return figures


# -- the report ----------------------------------------------------------------------------------


def file_system(folder: str) -> str:
    """The type of the file system holding *folder* (from /proc/mounts), if known."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    best, kind = "", "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and folder.startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def span(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """'min-max' of *values* times *scale* (one figure when they agree)."""
    if not values:
        return "-"
    low, high = f"{min(values) * scale:,.{digits}f}", f"{max(values) * scale:,.{digits}f}"
    return low if low == high else f"{low}-{high}"


COLUMNS = ("nursery_down", *(peer.name for peer in PEER_LIST))


def print_table(
    mode: Mode, results: dict[str, dict[int, Figures]], skipped: dict[str, str]
) -> None:
    ours = results["nursery_down"]
    huey = results.get("huey", {})
    what = f"min-max over {len(ours)} rounds, {JOBS:,} jobs, {WORKERS} workers"
    print(f"\nsynchronous={mode}, WAL: {what}")
    header = f"{'figure':<40}" + "".join(f"{name:>16}" for name in COLUMNS) + f"{'nd/huey':>12}"
    print(header)
    print("-" * len(header))

    def cells(values: dict[str, list[float]], scale: float, digits: int) -> str:
        line = ""
        for name in COLUMNS:
            if values.get(name):
                line += f"{span(values[name], scale, digits):>16}"
            else:
                line += f"{'skipped' if name in skipped else '-':>16}"
        return line

    # Ratios per round, over the rounds where both ran.
    paired = [(ours[number], huey[number]) for number in sorted(ours) if number in huey]
    for label, attribute in (
        ("1. enqueue, 20 producers (jobs/s)", "put"),
        ("2. claim+run+ack, 20 workers (jobs/s)", "consume"),
    ):
        values = {
            name: [getattr(figures, attribute) for figures in runs.values()]
            for name, runs in results.items()
        }
        ratios = [getattr(mine, attribute) / getattr(theirs, attribute) for mine, theirs in paired]
        ratio = f"{span(ratios, digits=2)}x" if ratios else "-"
        print(f"{label:<40}{cells(values, 1.0, 0)}{ratio:>12}")
    for key in (
        "put -> claim, same object",
        "put -> claim, other object",
        "ack under load",
        "ack, idle queue",
    ):
        number = "3." if key.startswith("put") else "4."
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            samples = [f.latency[key] for f in ours.values() if f.latency.get(key)]
            values = {"nursery_down": [percentile(s, fraction) for s in samples]}
            label = f"{number} {key}, {name} (ms)"
            print(f"{label:<40}{cells(values, 1000.0, 1)}")
    if mode == "FULL" and paired:
        worst = min(
            min(mine.put / theirs.put, mine.consume / theirs.consume) for mine, theirs in paired
        )
        verdict = "met" if worst >= 2 else "not met"
        print(f"goal nursery_down >= 2x huey on 1 and 2 at FULL: {verdict} (lowest {worst:.2f}x)")


def print_integrity(mode: Mode, results: dict[str, dict[int, Figures]]) -> None:
    """One line per queue and round whose jobs did not all run exactly once."""
    for name, runs in results.items():
        for number, figures in sorted(runs.items()):
            problems = []
            if figures.done != JOBS // WORKERS * WORKERS:
                problems.append(f"{figures.done} jobs run of {JOBS // WORKERS * WORKERS}")
            if figures.duplicates:
                problems.append(f"{figures.duplicates} run twice")
            if figures.missing:
                problems.append(f"{figures.missing} never run")
            if figures.left:
                problems.append(f"{figures.left} left in the queue")
            if figures.busy_retries:
                problems.append(f"{figures.busy_retries} calls retried after 'database is locked'")
            if problems:
                print(f"  {name}, {mode}, round {number}: " + ", ".join(problems))


def main() -> int:
    rounds = rounds_wanted()
    pythons: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for peer in PEER_LIST:
        python, detail = peer_python(peer)
        if python is None:
            skipped[peer.name] = detail
        else:
            pythons[peer.name] = python
            print(f"{peer.name} {detail}")
    print(f"nursery_down from {Path(nd.__file__).parent}")
    temp = tempfile.gettempdir()
    print(
        f"files in {temp} ({file_system(temp)}); Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}; load average "
        + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    )
    # Per mode and queue, the figures of each round by its number.
    results: dict[Mode, dict[str, dict[int, Figures]]] = {
        mode: {name: {} for name in COLUMNS} for mode in MODES
    }
    failures: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="nd-bench-sqlite-") as name:
        # Untimed: the first trio.run of the process starts its worker threads.
        trio.run(ours_throughput, Path(name) / "warm-up.db", "NORMAL", 200)
    started = time.perf_counter()
    for number in range(1, rounds + 1):
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix="nd-bench-sqlite-") as name:
                folder = Path(name)
                line = f"round {number} {mode:<6}"
                # The queues take turns, each round starting with the next one, so that a
                # slow spell of the shared disk does not always fall on the same queue.
                turn = (number - 1) % len(COLUMNS)
                for column in COLUMNS[turn:] + COLUMNS[:turn]:
                    got: Figures | str
                    if column == "nursery_down":
                        (folder / "nd").mkdir()
                        got = trio.run(ours_round, folder / "nd", mode)
                    elif column in pythons:
                        peer = next(peer for peer in PEER_LIST if peer.name == column)
                        got = run_peer(pythons[column], peer, folder / peer.module, mode)
                    else:
                        continue
                    if isinstance(got, str):
                        failures.setdefault(column, []).append(f"{mode}, round {number}: {got}")
                        line += f"  {column} failed"
                    else:
                        results[mode][column][number] = got
                        line += f"  {column} {got.put:,.0f}/{got.consume:,.0f}"
                print(line + " (put/consume jobs/s)", flush=True)
    for peer in PEER_LIST:
        if peer.name in failures and not any(results[mode][peer.name] for mode in MODES):
            skipped[peer.name] = failures.pop(peer.name)[0]
    for mode in MODES:
        print_table(mode, results[mode], skipped)
    print()
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    for name, reasons in failures.items():
        for reason in reasons:
            print(f"{name} failed in {reason}")
    for mode in MODES:
        print_integrity(mode, results[mode])
    elapsed = time.perf_counter() - started
    print(
        f"\n({elapsed:.0f} s; load average now "
        + " ".join(Path("/proc/loadavg").read_text().split()[:3])
        + f"; trio {trio.__version__})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
