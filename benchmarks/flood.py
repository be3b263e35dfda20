"""Do the jobs keep running while the dashboard is flooded with requests?

A server process (``--serve``) runs a worker pool of 20 workers over a backlog of
short jobs (each sleeps 0.02 s: a loop mostly idle) with the dashboard, and prints
its completed-job count four times a second. A load generator in another process
(``--load``: asyncio, raw sockets, keep-alive, so it shares nothing with the
service's loop) holds 100 connections each sending one request after another.

For each target (``/livez`` without a token, ``/api/snapshot`` with it) the figure is
the job rate during the flood over the job rate just before it (goal: >= 0.5x), with
the flood's request rate and its answers by status. ``--uncapped`` serves the
dashboard without its admission limits, to show what they change.

    python benchmarks/flood.py [--seconds S] [--rounds N] [--uncapped]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

import nursery_down as nd
from nursery_down.queues import MemoryQueue, QueuedJob

if TYPE_CHECKING:
    # mypy knows the source folder as "dashboard"; it is installed as nursery_down.dashboard.
    import dashboard._serve as serving
    from dashboard import serve_dashboard
else:
    import nursery_down.dashboard._serve as serving
    from nursery_down.dashboard import serve_dashboard

TOKEN = "benchmark-token-1b7e"
WORKERS = 20
JOB_SECONDS = 0.02
BACKLOG = 400_000
CONNECTIONS = 100
TARGETS = (("/livez", False), ("/api/snapshot", True))

# -- the server side -----------------------------------------------------------------------


async def serve(uncapped: bool) -> None:
    """The worker pool and the dashboard; prints the port, then completed counts."""
    if uncapped:

        def unlimited(app: Any, headers: Any, **_: Any) -> Any:
            return app

        vars(serving)["admit_requests"] = unlimited
    queue = MemoryQueue()
    queue.put_many_nowait(range(BACKLOG))
    completed = 0

    async def handle(job: QueuedJob) -> None:
        nonlocal completed
        await trio.sleep(JOB_SECONDS)
        completed += 1

    sup = nd.Supervisor(name="flood", grace=5.0)
    sup.add(nd.worker_pool(queue, handle, workers=WORKERS), name="pool")
    async with nd.open_supervisor(sup, handle_signals=True), trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
        print(json.dumps({"port": int(info.url.rsplit(":", 1)[1])}), flush=True)
        while not sup.snapshot()["draining"]:
            print(json.dumps({"t": time.monotonic(), "completed": completed}), flush=True)
            await trio.sleep(0.25)


# -- the load generator (its own process) ----------------------------------------------------


def load(port: int, path: str, auth: bool, seconds: float) -> None:
    """*CONNECTIONS* keep-alive clients on *path* for *seconds*; prints what they got."""
    header = f"Authorization: Bearer {TOKEN}\r\n" if auth else ""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{header}\r\n").encode()
    statuses: collections.Counter[str] = collections.Counter()

    async def client(until: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < until:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                statuses[head[9:12].decode()] += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            statuses["closed"] += 1
        finally:
            writer.close()

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(until) for _ in range(CONNECTIONS)))

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    answered = sum(n for status, n in statuses.items() if status != "closed")
    print(json.dumps({"rate": answered / elapsed, "statuses": dict(statuses)}), flush=True)


# -- the driver ------------------------------------------------------------------------------


class Counts:
    """The server's (time, completed) lines, read on a thread."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.port = int(json.loads(process.stdout.readline())["port"])
        self.samples: list[tuple[float, int]] = []
        self._stdout = process.stdout
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stdout:
            sample = json.loads(line)
            self.samples.append((sample["t"], sample["completed"]))

    def rate(self, start: float, end: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)


def flood_round(counts: Counts, path: str, auth: bool, seconds: float) -> dict[str, Any]:
    quiet_start = time.monotonic()
    time.sleep(seconds)
    quiet = counts.rate(quiet_start, time.monotonic())
    generator = subprocess.Popen(
        [sys.executable, __file__, "--load", str(counts.port), path, str(int(auth)), str(seconds)],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.3)  # connections open
    loaded_start = time.monotonic()
    out, _ = generator.communicate()
    loaded = counts.rate(loaded_start, time.monotonic())
    result = json.loads(out)
    return {"path": path, "quiet": quiet, "loaded": loaded, **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target")
    parser.add_argument("--uncapped", action="store_true", help="no admission limits")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.uncapped)
        return 0
    if args.load:
        port, path, auth, seconds = args.load
        load(int(port), path, auth == "1", float(seconds))
        return 0
    command = [sys.executable, __file__, "--serve"] + (["--uncapped"] if args.uncapped else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        counts = Counts(server)
        time.sleep(1.0)  # warm up
        for _ in range(args.rounds):
            for path, auth in TARGETS:
                r = flood_round(counts, path, auth, args.seconds)
                print(
                    f"{r['path']:<14} quiet {r['quiet']:6.0f} jobs/s  flooded {r['loaded']:6.0f}"
                    f" jobs/s  ratio {r['loaded'] / r['quiet']:.2f}  requests {r['rate']:6.0f}/s"
                    f"  answers {r['statuses']}",
                    flush=True,
                )
    finally:
        server.kill()  # its exit is measured in benchmarks/dashboard.py
        server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
