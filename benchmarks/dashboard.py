"""What the dashboard costs, and how fast it reacts and gets out of the way.

Every figure is a ratio or a percentile measured in this run, against a server
process started by this script (``--serve``) with 20 busy workers (each job enters
``ctx.job()`` and yields once, so the workers take every moment the loop has), or with
20 workers whose jobs each wait 3 s, as jobs waiting on I/O do (the demo's shape: the
figure is then the API's own cost); ``--job-seconds S`` measures one shape only:

1. ``GET /api/snapshot`` and ``GET /livez`` throughput against a bare quart-trio app
   (a JSON endpoint and a plain-text ``/livez``, hypercorn's default configuration)
   run as its own process, as a user would compare, 20 keep-alive connections each,
   alternating rounds (goal: >= 0.8x);
2. worker throughput (completed jobs per second) while ``/api/snapshot`` is
   hammered, against the same workers left alone;
3. state change to SSE delivery latency, p50 and p99, over 100 connected event
   streams (goal: p99 <= 50 ms): a service with no jobs is drained and started
   again, and each client subtracts the event's timestamp from its arrival time;
4. exit time after SIGTERM of ``nd.run(sup, dashboard=...)`` with 50 event streams
   connected and no jobs in flight (goal: <= 200 ms).

The load generator is a trio program on raw sockets, in this process.

    python benchmarks/dashboard.py [--seconds S] [--quick] [--job-seconds S]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

import nursery_down as nd

if TYPE_CHECKING:
    # mypy knows the source folder as "dashboard"; it is installed as nursery_down.dashboard.
    from dashboard import serve_dashboard
else:
    from nursery_down.dashboard import serve_dashboard

TOKEN = "benchmark-token-1b7e"
WORKERS = 20
CONNECTIONS = 20
SSE_CLIENTS = 100
EXIT_CLIENTS = 50
WARMUP_CYCLES = 5
#: The second shape's jobs: each waits this long, as the demo's do.
WAITING_JOB_SECONDS = 3.0
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
RETURNED_LINE = re.compile(rb"nd.run returned at ([0-9.]+)")
URL_LINE = re.compile(rb"nursery_down dashboard: http://127\.0\.0\.1:(\d+)/")

# -- the server side (python benchmarks/dashboard.py --serve ...) ---------------------------


def build_supervisor(workers: int, job_seconds: float = 0.0) -> nd.Supervisor:
    """``busy``: *workers* workers doing jobs of *job_seconds* (0: trivial jobs);
    ``flip``: no jobs, drains at once."""
    sup = nd.Supervisor(name="bench", grace=5.0)

    @sup.service
    async def busy(ctx: nd.ServiceContext) -> None:
        async with trio.open_nursery() as nursery:
            for number in range(workers):
                nursery.start_soon(_busy_worker, ctx, number, job_seconds)
            ctx.ready()
            await ctx.wait_draining()

    @sup.service
    async def flip(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    return sup


async def _busy_worker(ctx: nd.ServiceContext, number: int, job_seconds: float) -> None:
    done = 0
    while not ctx.draining:
        done += 1
        async with ctx.job(done, worker=number):
            if job_seconds:
                await trio.sleep(job_seconds)
            else:
                await trio.lowlevel.checkpoint()


async def serve_bare() -> None:
    """A bare quart-trio app on hypercorn, as a user would write it, in its own process.

    ``GET /json`` answers ``{"ok": true}`` and ``GET /livez`` ``ok``; prints its port.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio("bare")

    @app.get("/json")
    async def bare_json() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/livez")
    async def bare_livez() -> Response:
        return Response("ok\n", mimetype="text/plain")

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))
        print(json.dumps({"bare": int(binds[0].rsplit(":", 1)[1])}), flush=True)


async def serve_for_throughput(workers: int, job_seconds: float) -> None:
    """The dashboard with *workers* busy workers; prints its port; ends on SIGTERM."""
    sup = build_supervisor(workers, job_seconds)
    async with nd.open_supervisor(sup, handle_signals=True), trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
        gc.freeze()  # as nd.run does once every service started
        print(json.dumps({"dashboard": int(info.url.rsplit(":", 1)[1])}), flush=True)
        await sup.wait_finished()


# -- the load generator -------------------------------------------------------------------


def request(port: int, method: str, path: str, *, auth: bool = True) -> bytes:
    auth_line = f"Authorization: Bearer {TOKEN}\r\n" if auth else ""
    length = "Content-Length: 0\r\n" if method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth_line}{length}\r\n".encode()


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """One Content-Length response off *stream*; leftovers stay in *buffer*."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        buffer += await stream.receive_some(65536)
    found = CONTENT_LENGTH.search(bytes(buffer[:end]))
    length = int(found.group(1)) if found else 0
    total = end + 4 + length
    while len(buffer) < total:
        buffer += await stream.receive_some(65536)
    body = bytes(buffer[end + 4 : total])
    del buffer[:total]
    return body


async def call(port: int, method: str, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request(port, method, path))
        return await read_response(stream, bytearray())


async def completed_jobs(port: int) -> int:
    snapshot = json.loads(await call(port, "GET", "/api/snapshot?max_jobs=0"))
    return sum(int(service["completed"]) for service in snapshot["services"])


async def hammer(port: int, path: str, seconds: float, *, auth: bool) -> float:
    """Requests per second over *seconds*, from CONNECTIONS keep-alive connections."""
    done = 0
    payload = request(port, "GET", path, auth=auth)

    async def client() -> None:
        nonlocal done
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            buffer = bytearray()
            while True:
                await stream.send_all(payload)
                await read_response(stream, buffer)
                done += 1

    started = trio.current_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                nursery.start_soon(client)
    return done / (trio.current_time() - started)


class SSEClient:
    """Reads one event stream and records how late each state event arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.delays: list[float] = []
        self.last_seq = 0
        self.connected = trio.Event()
        self._progress = trio.Event()

    async def wait_for(self, seq: int) -> None:
        """Wait until this client received event number *seq*."""
        while self.last_seq < seq:
            self._progress = trio.Event()
            await self._progress.wait()

    async def run(self) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(request(self.port, "GET", "/api/events"))
            raw = bytearray()
            body = bytearray()
            while (end := raw.find(b"\r\n\r\n")) < 0:
                raw += await stream.receive_some(65536)
            del raw[: end + 4]
            arrived = time.time()
            while True:
                # The first message may have come with the headers: parse before reading.
                _dechunk(raw, body)
                while (end := body.find(b"\n\n")) >= 0:
                    self._message(bytes(body[:end]), arrived)
                    del body[: end + 2]
                data = await stream.receive_some(65536)
                if not data:
                    return
                arrived = time.time()
                raw += data

    def _message(self, block: bytes, arrived: float) -> None:
        if b"event: snapshot" in block:
            self.connected.set()
        if not block.startswith(b"event: event\n"):
            return
        event = json.loads(block.split(b"data: ", 1)[1])
        self.last_seq = event["seq"]
        self._progress.set()
        if event["kind"] == "state":
            self.delays.append(arrived - event["time"])


def _dechunk(raw: bytearray, body: bytearray) -> None:
    while (end := raw.find(b"\r\n")) >= 0:
        size = int(raw[:end], 16)
        if len(raw) < end + 2 + size + 2:
            return
        body += raw[end + 2 : end + 2 + size]
        del raw[: end + 2 + size + 2]


async def wait_connected(clients: list[SSEClient]) -> None:
    with trio.move_on_after(10):
        for client in clients:
            await client.connected.wait()
        return
    ready = sum(client.connected.is_set() for client in clients)
    raise RuntimeError(f"only {ready} of {len(clients)} event streams started within 10 s")


async def flip(port: int, cycles: int) -> None:
    """Drain and start the ``flip`` service *cycles* times."""
    for _ in range(cycles):
        for action in ("drain", "start"):
            answer = json.loads(await call(port, "POST", f"/api/services/flip/{action}"))
            assert "error" not in answer, answer
            # Apart at random, as operators act: never in step with the streams' timers.
            await trio.sleep(random.uniform(0.05, 0.25))


async def measure_latency(port: int, cycles: int) -> list[float]:
    clients = [SSEClient(port) for _ in range(SSE_CLIENTS)]
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.run)
        await wait_connected(clients)
        # Warm up: opening 100 connections at once leaves garbage whose collection
        # would land in the first measured changes; measure the steady state after it.
        await flip(port, WARMUP_CYCLES)
        for client in clients:
            client.delays.clear()
        await flip(port, cycles)
        last = max(client.last_seq for client in clients)
        with trio.move_on_after(5):
            for client in clients:
                await client.wait_for(last)
        nursery.cancel_scope.cancel()
    return [delay for client in clients for delay in client.delays]


async def measure_exit(port: int, process: subprocess.Popen[bytes]) -> tuple[float, float]:
    """SIGTERM with EXIT_CLIENTS streams open: (wall-clock time sent, seconds to exit)."""
    clients = [SSEClient(port) for _ in range(EXIT_CLIENTS)]
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.run)
        await wait_connected(clients)
        sent, wall = time.perf_counter(), time.time()
        process.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(process.wait)
        took = time.perf_counter() - sent
        nursery.cancel_scope.cancel()
    return wall, took


# -- orchestration ------------------------------------------------------------------------


def start_server(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_throughput(
    seconds: float, rounds: int, cycles: int, workers: int = WORKERS, job_seconds: float = 0.0
) -> dict[str, Any]:
    process = start_server(
        ["--serve", "--workers", str(workers), "--job-seconds", repr(job_seconds)]
    )
    bare_process = start_server(["--bare"])
    try:
        assert process.stdout is not None
        assert bare_process.stdout is not None
        dashboard = json.loads(await trio.to_thread.run_sync(process.stdout.readline))["dashboard"]
        bare = json.loads(await trio.to_thread.run_sync(bare_process.stdout.readline))["bare"]
        await trio.sleep(0.5)  # let the workers reach their pace

        idle_rates, hammered_rates, bare_rps, snapshot_rps = [], [], [], []
        bare_livez_rps, livez_rps = [], []
        for _ in range(rounds):
            bare_rps.append(await hammer(bare, "/json", seconds, auth=False))
            before, started = await completed_jobs(dashboard), trio.current_time()
            snapshot_rps.append(await hammer(dashboard, "/api/snapshot", seconds, auth=True))
            after = await completed_jobs(dashboard)
            hammered_rates.append((after - before) / (trio.current_time() - started))
            bare_livez_rps.append(await hammer(bare, "/livez", seconds, auth=False))
            livez_rps.append(await hammer(dashboard, "/livez", seconds, auth=False))
            before, started = await completed_jobs(dashboard), trio.current_time()
            await trio.sleep(seconds)
            after = await completed_jobs(dashboard)
            idle_rates.append((after - before) / (trio.current_time() - started))
        delays = await measure_latency(dashboard, cycles)
        process.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(process.wait)
    finally:
        for each in (process, bare_process):
            if each.poll() is None:
                each.kill()
                each.wait()
    bare_median, snapshot_median = statistics.median(bare_rps), statistics.median(snapshot_rps)
    idle, hammered = statistics.median(idle_rates), statistics.median(hammered_rates)
    bare_livez, livez = statistics.median(bare_livez_rps), statistics.median(livez_rps)
    return {
        "bare_rps": bare_median,
        "snapshot_rps": snapshot_median,
        "ratio": snapshot_median / bare_median,
        "idle_jobs_per_s": idle,
        "hammered_jobs_per_s": hammered,
        "worker_loss": 1 - hammered / idle,
        "bare_livez_rps": bare_livez,
        "livez_rps": livez,
        "latency_p50_ms": 1000 * percentile(delays, 0.50),
        "latency_p99_ms": 1000 * percentile(delays, 0.99),
        "latency_samples": len(delays),
    }


async def run_exit(runs: int) -> tuple[list[float], list[float]]:
    """Per run: seconds from SIGTERM until ``nd.run`` returned, and until the process exited."""
    returned, exited = [], []
    for _ in range(runs):
        process = start_server(["--exit-target"], {"NURSERY_DOWN_TOKEN": TOKEN})
        try:
            assert process.stderr is not None
            stderr = process.stderr
            match = None
            while match is None:
                line = await trio.to_thread.run_sync(stderr.readline)
                if not line:
                    raise RuntimeError("the exit target ended before printing its address")
                match = URL_LINE.search(line)
            # Keep reading its stderr so the target never blocks on a full pipe.
            lines: list[bytes] = []
            reader = threading.Thread(target=lines.extend, args=(stderr,), daemon=True)
            reader.start()
            sent, took = await measure_exit(int(match.group(1)), process)
            await trio.to_thread.run_sync(reader.join, 5.0)
            if process.returncode != 0:
                raise RuntimeError(f"the exit target ended with code {process.returncode}")
            stamp = next(RETURNED_LINE.search(line) for line in lines if RETURNED_LINE.search(line))
            assert stamp is not None
            returned.append(float(stamp.group(1)) - sent)
            exited.append(took)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return returned, exited


def report_throughput(
    results: dict[str, Any], seconds: float, job_seconds: float, shape: str
) -> None:
    print(f"{shape}; {CONNECTIONS} keep-alive connections; {seconds:g} s per round\n")
    print("| figure | value | goal |")
    print("|---|---|---|")
    print(
        f"| GET /api/snapshot vs bare quart-trio JSON | {results['ratio']:.2f}x "
        f"({results['snapshot_rps']:.0f} vs {results['bare_rps']:.0f} req/s) | >= 0.8x |"
    )
    if job_seconds >= seconds:
        print(
            "| worker throughput while /api/snapshot is hammered | not measured: "
            "each job outlasts a round | |"
        )
    else:
        print(
            f"| worker throughput while /api/snapshot is hammered | "
            f"{results['hammered_jobs_per_s'] / results['idle_jobs_per_s']:.2f}x "
            f"({results['worker_loss']:.0%} lost: {results['hammered_jobs_per_s']:.0f} vs "
            f"{results['idle_jobs_per_s']:.0f} jobs/s) | reported |"
        )
    print(
        f"| GET /livez vs bare quart-trio /livez | "
        f"{results['livez_rps'] / results['bare_livez_rps']:.2f}x "
        f"({results['livez_rps']:.0f} vs {results['bare_livez_rps']:.0f} req/s) | >= 0.8x |"
    )
    print(
        f"| state change to SSE delivery, {SSE_CLIENTS} streams, p50 | "
        f"{results['latency_p50_ms']:.1f} ms | |"
    )
    print(
        f"| state change to SSE delivery, {SSE_CLIENTS} streams, p99 | "
        f"{results['latency_p99_ms']:.1f} ms ({results['latency_samples']} deliveries) | <= 50 ms |"
    )
    print()


def report_exit(returned: list[float], exited: list[float]) -> None:
    print("| figure | value | goal |")
    print("|---|---|---|")
    print(
        f"| SIGTERM to nd.run returning, {EXIT_CLIENTS} streams, no jobs (median of "
        f"{len(returned)}) | {1000 * statistics.median(returned):.0f} ms "
        f"(max {1000 * max(returned):.0f} ms) | |"
    )
    print(
        f"| SIGTERM to process exit, {EXIT_CLIENTS} streams, no jobs (median of {len(exited)}) | "
        f"{1000 * statistics.median(exited):.0f} ms (max {1000 * max(exited):.0f} ms) | <= 200 ms |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per round")
    parser.add_argument("--quick", action="store_true", help="shorter rounds, fewer samples")
    parser.add_argument("--workers", type=int, default=WORKERS, help="busy workers (default 20)")
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=None,
        help="each job waits this long (0: trivial jobs, never idle); default: both 0 and "
        f"{WAITING_JOB_SECONDS:g}",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--exit-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.bare:
        trio.run(serve_bare)
        return 0
    if args.serve:
        trio.run(serve_for_throughput, args.workers, args.job_seconds or 0.0)
        return 0
    if args.exit_target:
        code = nd.run(build_supervisor(0), dashboard="127.0.0.1:0")
        print(f"nd.run returned at {time.time()}", file=sys.stderr, flush=True)
        return code
    seconds = 0.5 if args.quick else args.seconds
    rounds, cycles, runs = (1, 5, 1) if args.quick else (3, 20, 5)

    shapes = [0.0, WAITING_JOB_SECONDS] if args.job_seconds is None else [args.job_seconds]

    async def measure() -> tuple[list[dict[str, Any]], list[float], list[float]]:
        results = [
            await run_throughput(seconds, rounds, cycles, args.workers, job_seconds)
            for job_seconds in shapes
        ]
        returned, exited = await run_exit(runs)
        return results, returned, exited

    results, returned, exited = trio.run(measure)
    for job_seconds, result in zip(shapes, results, strict=True):
        shape = (
            f"{args.workers} workers, each job waiting {job_seconds:g} s"
            if job_seconds
            else f"{args.workers} busy workers (trivial jobs, never idle)"
        )
        report_throughput(result, seconds, job_seconds, shape)
    report_exit(returned, exited)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
