"""What the operator views cost the job loop: the tree before them against the tree after.

Health checks, job sources (figures and rates in the snapshot, read every 2 s), the
charts, drain reports and task-chain inspection all added to what each snapshot and
each event stream carries. This measures, in one run, the job throughput of the same
program in the tree before them (``--before``, default ``cf2db1b``) and the tree
after (``--after``, default ``HEAD``), each checked out by this script into a
temporary ``git worktree`` (removed at the end) and imported from there by a
subprocess, so neither side sees the other's code.

The program (``--serve``): ``nd.open_supervisor(sup, dashboard="127.0.0.1:0")``
with the operator token from ``NURSERY_DOWN_TOKEN`` and three services: ``pool``, a
``worker_pool`` of 20 workers over a ``MemoryQueue`` whose trivial jobs yield once and
put their payload back (the backlog never runs out), and two idle services. A
``MemoryQueue`` rather than a ``SQLiteQueue``: with nothing but the trio loop between
one job and the next, every microsecond the dashboard spends in that loop is a
microsecond the jobs lose, so the rate shows the views' cost undiluted by disk writes
and thread hand-offs (a ``SQLiteQueue``'s claim+ack runs near 650 jobs/s, its loop
mostly idle). The rate is completed jobs per CPU-second of the server process over
a window (its loop is its only busy thread: the jobs and the dashboard share that
CPU time, and time spent waiting for a core on a shared machine does not count), and
per second of its clock, which agrees on an idle machine.

Scenarios, each in a fresh server process, the clients in another process (asyncio,
raw sockets, keep-alive, so parsing never slows the measured loop):

- ``quiet``: the dashboard served, no client;
- ``poll 4/s``: one client asking ``GET /api/snapshot`` four times a second;
- ``10 streams`` / ``100 streams``: that many ``GET /api/events`` streams open.

For each round and scenario both sides run one after the other, the side that goes
first swapping every round (before, after, after, before...), so both share the
machine's conditions; the figure is the median, minimum and maximum over the rounds
of after/before, per CPU-second first. Also, in a process per side and round: the
time of one ``Supervisor.snapshot()`` call and of one event-stream snapshot message
(built and encoded) with the same three services and 20 jobs in flight,
``timeit``-style (best of 7 repeats).

The after side is a commit (``HEAD``), so edits not yet committed in the checkout
are left out; ``--after working-tree`` measures the checkout as it is.

    python benchmarks/views_cost.py [--rounds N] [--seconds S] [--quick]
                                     [--before REV] [--after REV|working-tree]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import nursery_down as nd
    from nursery_down.queues import MemoryQueue, QueuedJob

TOKEN = "benchmark-token-1b7e"
WORKERS = 20
BACKLOG = 200
POLL_RATE = 4.0
SCENARIOS: tuple[tuple[str, str, int], ...] = (
    ("quiet", "none", 0),
    (f"poll {POLL_RATE:g}/s", "poll", 1),
    ("10 streams", "events", 10),
    ("100 streams", "events", 100),
)
BEFORE = "cf2db1b"
REPOSITORY = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"nursery_down dashboard: http://127\.0\.0\.1:(\d+)/")

# -- importing the tree under measurement ---------------------------------------------


class _TreeFinder(importlib.abc.MetaPathFinder):
    """Imports ``nursery_down`` and ``nursery_down.dashboard`` from one source tree.

    The editable install maps ``nursery_down.dashboard`` to the working tree's
    ``dashboard/`` folder whatever ``sys.path`` says; this finder, first on
    ``sys.meta_path``, maps both packages to *tree* (their submodules follow their
    ``__path__``).
    """

    def __init__(self, tree: Path) -> None:
        self.packages = {
            "nursery_down": tree / "nursery_down",
            "nursery_down.dashboard": tree / "dashboard",
        }

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = self.packages.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def use_tree(tree: Path) -> None:
    """Make every later ``import nursery_down...`` come from *tree*."""
    sys.path.insert(0, str(tree))
    sys.meta_path.insert(0, _TreeFinder(tree))


def imported_from() -> dict[str, str]:
    """Where the measured packages were imported from (checked by the driver)."""
    return {
        name: str(getattr(sys.modules.get(name), "__file__", None))
        for name in ("nursery_down", "nursery_down.dashboard", "nursery_down._pool")
    }


# -- the measured program (python benchmarks/views_cost.py --serve TREE) ------------------


def build_supervisor(queue: MemoryQueue, handle: Callable[[QueuedJob], Any]) -> nd.Supervisor:
    """``pool``: a worker pool of WORKERS over *queue*; ``api`` and ``cron``: idle."""
    import nursery_down as nd

    sup = nd.Supervisor(name="views", grace=5.0)
    sup.add(nd.worker_pool(queue, handle, workers=WORKERS), name="pool")

    async def idle(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    sup.add(idle, name="api")
    sup.add(idle, name="cron")
    return sup


async def serve() -> None:
    """The program under measurement; answers ``count`` on stdin until ``stop``."""
    import nursery_down as nd
    from nursery_down.queues import MemoryQueue

    queue = MemoryQueue()
    queue.put_many_nowait(range(BACKLOG))
    completed = 0

    async def handle(job: QueuedJob) -> None:
        nonlocal completed
        await trio.lowlevel.checkpoint()
        queue.put_nowait(job.payload)  # the backlog never runs out
        completed += 1

    sup = build_supervisor(queue, handle)
    async with nd.open_supervisor(sup, dashboard="127.0.0.1:0"):
        gc.freeze()  # as nd.run does once every service started
        print(json.dumps({"imported": imported_from()}), flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if line.strip() != "count":
                break
            figures = {"t": time.perf_counter(), "cpu": time.process_time(), "done": completed}
            print(json.dumps(figures), flush=True)


async def snapshot_cost(repeat: int) -> dict[str, Any]:
    """Seconds per ``Supervisor.snapshot()`` and per event-stream snapshot message,
    with WORKERS jobs in flight (each waits until the measurement ends)."""
    import nursery_down as nd
    from nursery_down.dashboard import _streams
    from nursery_down.queues import MemoryQueue

    queue = MemoryQueue()
    queue.put_many_nowait(range(2 * WORKERS))
    release, all_started = trio.Event(), trio.Event()
    started = 0

    async def handle(job: QueuedJob) -> None:
        nonlocal started
        started += 1
        if started == WORKERS:
            all_started.set()
        await release.wait()

    sup = build_supervisor(queue, handle)
    async with nd.open_supervisor(sup):
        await all_started.wait()
        await trio.sleep(0.2)  # the job sources read once (where they are read)
        gc.collect()
        gc.freeze()

        def message() -> bytes:
            return bytes(_streams.frame("snapshot", _streams.live_snapshot(sup)))

        results: dict[str, Any] = {"imported": imported_from()}
        for name, function in (("snapshot", sup.snapshot), ("message", message)):
            timer = timeit.Timer(function)
            number, _ = timer.autorange()
            results[name] = min(timer.repeat(repeat, number)) / number
        in_flight = sup.snapshot()["services"][0]["in_flight"]
        results["in_flight"] = in_flight
        results["snapshot_bytes"] = len(json.dumps(sup.snapshot(), separators=(",", ":")))
        results["message_bytes"] = len(message())
        release.set()
        queue.close()
    return results


# -- the clients (python benchmarks/views_cost.py --load PORT KIND N), asyncio -------------


@dataclass
class LoadFigures:
    """What the clients received since the ``mark`` line."""

    streams_ready: int = 0
    snapshots: int = 0
    received: int = 0
    answers: collections.Counter[str] = field(default_factory=collections.Counter)

    def reset(self) -> None:
        self.snapshots = self.received = 0
        self.answers.clear()


def http_request(port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()


async def event_stream(port: int, figures: LoadFigures, ready: asyncio.Event) -> None:
    """One ``/api/events`` stream, read to the end; counts its snapshot messages."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(http_request(port, "/api/events"))
        head = await reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200":
            raise RuntimeError(f"/api/events answered {head[:12]!r}")
        tail = b""
        while data := await reader.read(65536):
            seen = tail + data  # a marker split across two reads still counts once
            found = seen.count(b"event: snapshot")
            figures.snapshots += found
            figures.received += len(data)
            tail = seen[-14:]  # shorter than the marker: never counted twice
            if found and not ready.is_set():
                ready.set()
                figures.streams_ready += 1
    finally:
        writer.close()


async def snapshot_poller(port: int, figures: LoadFigures, ready: asyncio.Event) -> None:
    """``GET /api/snapshot`` POLL_RATE times a second on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = http_request(port, "/api/snapshot")
    due = time.monotonic()
    try:
        while True:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            figures.answers[head[9:12].decode()] += 1
            figures.received += len(body)
            ready.set()
            due += 1 / POLL_RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    finally:
        writer.close()


async def run_load(port: int, kind: str, count: int) -> None:
    """Open the clients, say ``ready``, count from ``mark`` to ``stop`` (stdin lines)."""
    figures = LoadFigures()
    client = event_stream if kind == "events" else snapshot_poller
    readies = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(client(port, figures, ready)) for ready in readies]
    waits = [asyncio.create_task(ready.wait()) for ready in readies]
    done, _ = await asyncio.wait(waits, timeout=30, return_when=asyncio.ALL_COMPLETED)
    failed = [task.exception() for task in tasks if task.done() and task.exception()]
    if len(done) < count or failed:
        raise RuntimeError(f"only {len(done)} of {count} clients started: {failed[:1]}")
    print(json.dumps({"ready": count}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # mark
    figures.reset()
    started = time.monotonic()
    await loop.run_in_executor(None, sys.stdin.readline)  # stop
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "snapshots": figures.snapshots,
                "received": figures.received,
                "answers": dict(figures.answers),
                "ended": sum(task.done() for task in tasks),
            }
        ),
        flush=True,
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the driver -----------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


class Process:
    """A child process of this script spoken to by lines: JSON out, commands in."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read_errors, daemon=True)
        self._reader.start()

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        self.errors.extend(self.process.stderr)

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(10)
            self._reader.join(5)
            raise RuntimeError(
                f"{self.process.args!r} ended (code {self.process.returncode}):\n"
                + "".join(self.errors[-30:])
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def ask(self, line: str) -> dict[str, Any]:
        self.send(line)
        return self.receive()

    def close(self, timeout: float = 15.0) -> None:
        try:
            self.send("stop")
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def port(self) -> int:
        for _ in range(100):
            for line in self.errors:
                if found := URL_LINE.search(line):
                    return int(found.group(1))
            time.sleep(0.05)
        raise RuntimeError("the server printed no dashboard address:\n" + "".join(self.errors))


def check_tree(imported: dict[str, str], tree: Path) -> None:
    for name, where in imported.items():
        if not where.startswith(str(tree) + os.sep):
            raise RuntimeError(f"{name} came from {where}, not from {tree}")


@dataclass
class Window:
    """One measured window of one server process."""

    jobs_per_s: float
    jobs_per_cpu_s: float
    #: The server's CPU seconds per second: below 1, it waited for a core.
    cpu_share: float
    load: dict[str, Any] | None


def measure(tree: Path, kind: str, count: int, warmup: float, seconds: float) -> Window:
    """One server process of *tree*, its clients, and the job rate over *seconds*."""
    server = Process(["--serve", str(tree)], {"NURSERY_DOWN_TOKEN": TOKEN})
    load = None
    try:
        check_tree(server.receive()["imported"], tree)
        port = server.port()
        time.sleep(warmup)
        if kind != "none":
            load = Process(["--load", str(port), kind, str(count)])
            load.receive()  # every client connected and answered
            time.sleep(0.5)
            load.send("mark")
        first = server.ask("count")
        time.sleep(seconds)
        last = server.ask("count")
        received = load.ask("stop") if load is not None else None
    finally:
        if load is not None:
            load.close()
        server.close()
    done = last["done"] - first["done"]
    wall, cpu = last["t"] - first["t"], last["cpu"] - first["cpu"]
    return Window(done / wall, done / cpu, cpu / wall, received)


def cost(tree: Path, repeat: int) -> dict[str, Any]:
    process = Process(["--micro", str(tree), str(repeat)])
    try:
        result = process.receive()
    finally:
        process.close()
    check_tree(result["imported"], tree)
    return result


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (the machine is shared)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report_rates(windows: dict[tuple[str, str], list[Window]], rounds: int, seconds: float) -> None:
    print(
        f"{WORKERS} workers, trivial jobs, worker_pool over MemoryQueue; {rounds} rounds of "
        f"{seconds:g} s per scenario and side; after/before: median (min-max) over the "
        "rounds' pairs; b / a: before / after\n"
    )
    print(
        "| scenario | after/before, jobs per CPU-s | after/before, jobs per s "
        "| jobs per CPU-s, b / a | jobs per s, b / a | vs quiet per CPU-s, b / a "
        "| server's CPU share, b / a | what the clients got, b / a |"
    )
    print("|---|---|---|---|---|---|---|---|")
    quiet = {side: windows[(SCENARIOS[0][0], side)] for side in ("before", "after")}
    for name, kind, count in SCENARIOS:
        before, after = windows[(name, "before")], windows[(name, "after")]
        cpu = _ratios(after, before, lambda w: w.jobs_per_cpu_s)
        wall = _ratios(after, before, lambda w: w.jobs_per_s)
        versus = " / ".join(
            f"{statistics.median(_ratios(ws, quiet[side], lambda w: w.jobs_per_cpu_s)):.3f}"
            for side, ws in (("before", before), ("after", after))
        )
        got = "-"
        if kind == "events":
            got = " / ".join(
                f"{statistics.median(_per_stream(w, count) for w in ws):.2f}"
                for ws in (before, after)
            )
            got += " snapshot messages per stream per s"
        elif kind == "poll":
            got = " / ".join(
                ", ".join(f"{n} x {status}" for status, n in sorted(_answers(ws).items()))
                for ws in (before, after)
            )
        print(
            f"| {name} | {spread(cpu)} | {spread(wall)} "
            f"| {_medians(before, after, lambda w: w.jobs_per_cpu_s, '{:,.0f}')} "
            f"| {_medians(before, after, lambda w: w.jobs_per_s, '{:,.0f}')} | {versus} "
            f"| {_medians(before, after, lambda w: w.cpu_share, '{:.2f}')} | {got} |"
        )


def _ratios(
    windows: list[Window], baselines: list[Window], figure: Callable[[Window], float]
) -> list[float]:
    """Each round's figure of *windows* over the same round's of *baselines*."""
    return [figure(w) / figure(b) for w, b in zip(windows, baselines, strict=True)]


def _medians(
    before: list[Window], after: list[Window], figure: Callable[[Window], float], shown: str
) -> str:
    return " / ".join(shown.format(statistics.median(map(figure, ws))) for ws in (before, after))


def _per_stream(window: Window, count: int) -> float:
    assert window.load is not None
    return float(window.load["snapshots"]) / float(window.load["seconds"]) / count


def _answers(windows: list[Window]) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for window in windows:
        assert window.load is not None
        total.update(window.load["answers"])
    return total


def report_costs(costs: dict[str, list[dict[str, Any]]]) -> None:
    before, after = costs["before"], costs["after"]
    print(
        f"\nOne call, 3 services, {WORKERS} jobs in flight; best of the repeats in each "
        "process, median (min-max) over the processes\n"
    )
    print("| call | before | after | after/before |")
    print("|---|---|---|---|")
    for key, label in (
        ("snapshot", "`Supervisor.snapshot()`"),
        ("message", "event-stream snapshot message (built and encoded)"),
    ):
        b = [1e6 * c[key] for c in before]
        a = [1e6 * c[key] for c in after]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(
            f"| {label} | {statistics.median(b):.1f} us | {statistics.median(a):.1f} us "
            f"| {spread(ratios)} |"
        )
    for key, label in (("snapshot_bytes", "snapshot JSON"), ("message_bytes", "message")):
        print(f"| size of the {label} | {before[0][key]:,} B | {after[0][key]:,} B | |")


def run(args: argparse.Namespace) -> int:
    rounds = 1 if args.quick else args.rounds
    seconds = 1.0 if args.quick else args.seconds
    warmup = 0.5 if args.quick else 1.0
    repeat = 3 if args.quick else 7
    revisions = {"before": git("rev-parse", "--verify", f"{args.before}^{{commit}}")}
    if args.after != "working-tree":
        revisions["after"] = git("rev-parse", "--verify", f"{args.after}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="views-cost-") as folder:
        trees = {"after": REPOSITORY}
        try:
            for side, revision in revisions.items():
                trees[side] = Path(folder) / side
                git("worktree", "add", "--detach", str(trees[side]), revision)
            shown = {side: revisions.get(side, "")[:12] or "the working tree" for side in trees}
            print(
                f"before: {shown['before']}, after: {shown['after']}; "
                f"load average at the start: {load_average()}",
                flush=True,
            )
            windows: dict[tuple[str, str], list[Window]] = collections.defaultdict(list)
            costs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
            for number in range(rounds):
                order = ("before", "after") if number % 2 == 0 else ("after", "before")
                for side in order:
                    costs[side].append(cost(trees[side], repeat))
                for name, kind, count in SCENARIOS:
                    for side in order:
                        window = measure(trees[side], kind, count, warmup, seconds)
                        windows[(name, side)].append(window)
                print(f"round {number + 1} of {rounds}: load average {load_average()}", flush=True)
        finally:
            for side in revisions:
                remove = ["worktree", "remove", "--force", str(trees[side])]
                subprocess.run(["git", "-C", str(REPOSITORY), *remove], check=False)
    print()
    report_rates(windows, rounds, seconds)
    report_costs(costs)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--before", default=BEFORE, help=f"revision before (default {BEFORE})")
    parser.add_argument(
        "--after", default="HEAD", help="revision after (default HEAD), or working-tree"
    )
    parser.add_argument("--serve", metavar="TREE", help=argparse.SUPPRESS)
    parser.add_argument("--micro", nargs=2, metavar=("TREE", "REPEAT"), help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=3, metavar=("PORT", "KIND", "N"), help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.serve:
        use_tree(Path(args.serve))
        trio.run(serve)
        return 0
    if args.micro:
        use_tree(Path(args.micro[0]))
        print(json.dumps(trio.run(snapshot_cost, int(args.micro[1]))), flush=True)
        return 0
    if args.load:
        port, kind, count = args.load
        asyncio.run(run_load(int(port), kind, int(count)))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
