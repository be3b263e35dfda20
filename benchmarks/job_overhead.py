"""What ``ctx.intake()`` + ``ctx.job()`` cost per job, against a raw trio worker pool.

Every side runs 20 workers reading one unbuffered memory channel that a producer
fills and then closes, in a fresh ``trio.run`` each time:

- raw: ``async for item in channel: work()``;
- raw + shield: the same with ``with trio.CancelScope(shield=True): work()``, the
  least any design with its own shield per job can cost (the ceiling for ours);
- nursery_down: one service of a real Supervisor whose workers do
  ``async for item in ctx.intake(channel): async with ctx.job(item): work()``.

``work()`` is either nothing (the cost of the machinery alone) or 100 us of busy
CPU work. The sides alternate, several rounds each; medians are reported, with the
ratio of job rates and the overhead per job, ``1/rate_nd - 1/rate_raw``.

Rates are jobs per CPU-second of this process (``time.process_time``) unless
``--clock wall`` is given: on a shared machine, time spent waiting for a CPU would
otherwise land on whichever side happened to be running. On an idle machine the
two clocks agree.

    python benchmarks/job_overhead.py [--rounds N] [--scale X] [--clock cpu|wall] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

import nursery_down as nd

WORKERS = 20
BUSY_SECONDS = 100e-6
#: The clock every side is timed with, and the busy work spins on (see --clock).
clock: Callable[[], float] = time.process_time


def trivial() -> None:
    pass


def busy() -> None:
    end = clock() + BUSY_SECONDS
    while clock() < end:
        pass


Work = Callable[[], None]
Side = Callable[[int, Work], float]


async def _produce(send: trio.MemorySendChannel[int], jobs: int) -> None:
    async with send:
        for item in range(jobs):
            await send.send(item)


def run_raw(jobs: int, work: Work) -> float:
    """Seconds the raw pool takes to run *jobs* jobs."""

    async def worker(receive: trio.MemoryReceiveChannel[int]) -> None:
        async for _ in receive:
            work()

    return _run_pool(jobs, worker)


def run_raw_shielded(jobs: int, work: Work) -> float:
    """Seconds the raw pool takes with a bare shielded cancel scope around each job."""

    async def worker(receive: trio.MemoryReceiveChannel[int]) -> None:
        async for _ in receive:
            with trio.CancelScope(shield=True):  # noqa: ASYNC100  # its cost is the point
                work()

    return _run_pool(jobs, worker)


def _run_pool(
    jobs: int, worker: Callable[[trio.MemoryReceiveChannel[int]], Awaitable[None]]
) -> float:
    async def main() -> float:
        send, receive = trio.open_memory_channel[int](0)
        started = clock()
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(worker, receive)
            nursery.start_soon(_produce, send, jobs)
        return clock() - started

    return trio.run(main)


def run_nursery_down(jobs: int, work: Work) -> float:
    """Seconds a Supervisor's service takes to run *jobs* jobs through intake + job."""
    send, receive = trio.open_memory_channel[int](0)
    sup = nd.Supervisor(name="bench")
    timing: dict[str, float] = {}

    @sup.service(restart="temporary")
    async def workers(ctx: nd.ServiceContext) -> None:
        async def worker() -> None:
            async for item in ctx.intake(receive):
                async with ctx.job(item):
                    work()

        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(worker)
            ctx.ready()
            timing["started"] = clock()
            nursery.start_soon(_produce, send, jobs)
        timing["ended"] = clock()

    async def main() -> None:
        async with nd.open_supervisor(sup):
            await sup.wait_finished()

    trio.run(main)
    completed = sup.snapshot()["services"][0]["completed"]
    if completed != jobs:
        raise RuntimeError(f"nursery_down side completed {completed} of {jobs} jobs")
    return timing["ended"] - timing["started"]


@dataclass
class Result:
    label: str
    raw_rate: float
    shielded_rate: float
    nd_rate: float
    goal: float

    @staticmethod
    def overhead_us(rate: float, base: float) -> float:
        return (1 / rate - 1 / base) * 1e6


def measure(label: str, work: Work, jobs: int, rounds: int, goal: float) -> Result:
    sides: list[Side] = [run_raw, run_raw_shielded, run_nursery_down]
    rates: dict[Side, list[float]] = {side: [] for side in sides}
    for side in sides:
        side(jobs // 10, work)  # warm-up: caches, CPU frequency
    for round_ in range(rounds):
        # Alternate the order, so a drift in machine speed hits every side alike.
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            gc.collect()
            rates[side].append(jobs / side(jobs, work))
    raw, shielded, ours = (statistics.median(rates[side]) for side in sides)
    return Result(label, raw, shielded, ours, goal)


def main(argv: list[str] | None = None) -> int:
    global clock
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of each side (default 7)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the job counts")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time with process CPU time (default) or wall-clock time",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of half as many jobs (a smoke run)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.scale = 3, args.scale / 2
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = [
        measure("trivial", trivial, int(20_000 * args.scale), args.rounds, 0.65),
        measure("100 us busy", busy, int(3_000 * args.scale), args.rounds, 0.95),
    ]
    unit = "CPU-second" if args.clock == "cpu" else "second"
    print(
        f"{WORKERS} workers, one unbuffered memory channel, jobs per {unit}; median of "
        f"{args.rounds} interleaved runs per side (Python {sys.version.split()[0]}, "
        f"trio {trio.__version__})\n"
    )
    print(
        "| jobs | raw pool | raw + shield per job | intake + job | ratio to raw "
        "| overhead per job | ceiling (raw + shield) | goal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = r.nd_rate / r.raw_rate
        met = "met" if ratio >= r.goal else "missed"
        print(
            f"| {r.label} | {r.raw_rate:,.0f} | {r.shielded_rate:,.0f} | {r.nd_rate:,.0f} "
            f"| {ratio:.2f}x | {Result.overhead_us(r.nd_rate, r.raw_rate):.1f} us "
            f"| {r.shielded_rate / r.raw_rate:.2f}x "
            f"({Result.overhead_us(r.shielded_rate, r.raw_rate):.1f} us) "
            f"| >= {r.goal:.2f}x ({met}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
