"""What ``ctx.intake()`` + ``ctx.job()`` cost per job, against a raw trio worker pool.

Every side runs 20 workers reading one unbuffered memory channel that a producer
fills and then closes, in a fresh ``trio.run`` each time:

- raw: ``async for item in channel: work()``;
- raw + shield: the same with ``with trio.CancelScope(shield=True): work()``, the
  least a design that enters a new cancel scope per job can cost;
- nursery_down: one service of a real Supervisor whose 20 workers, started with
  ``ctx.run_workers``, do
  ``async for item in ctx.intake(channel): async with ctx.job(item): work()``;
- own tasks: the same workers started in a nursery of the service's own, where
  each job enters a shielded scope of its own;
- intake only: the ``ctx.run_workers`` workers reading through ``ctx.intake()``
  with no job block, which shows what intake costs.

``work()`` is either nothing (the cost of the machinery alone) or about 100 us of
pure-Python CPU work (a loop calibrated at start-up). Each round runs every side
once, in alternating order; a side's ratio is the median over the rounds of its
rate divided by the raw pool's rate in the same round, which cancels slow drifts in
machine speed. The overhead per job is ``(1/ratio - 1) / rate_raw``.

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
#: The clock every side is timed with (see --clock).
clock: Callable[[], float] = time.process_time
#: Iterations of the busy loop that take BUSY_SECONDS (see calibrate()).
busy_loops = 0


def trivial() -> None:
    pass


def busy() -> None:
    for _ in range(busy_loops):
        pass


def calibrate() -> int:
    """How many iterations of busy()'s loop take BUSY_SECONDS on this machine.

    The work is a plain Python loop, like a handler's own code, rather than a loop
    spinning on a clock. Reading the process CPU clock is a system call, and with
    jobs made mostly of system calls the per-job cost of every side, even of a bare
    cancel scope, measured about twice what it is with trivial jobs.
    """
    global busy_loops
    estimates = []
    for _ in range(5):
        busy_loops = 100_000
        started = time.perf_counter()
        busy()
        estimates.append(BUSY_SECONDS / (time.perf_counter() - started) * 100_000)
    busy_loops = int(statistics.median(estimates))
    return busy_loops


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
    """Seconds a Supervisor's service takes to run *jobs* jobs in ``ctx.run_workers``."""
    return _run_service(jobs, work, own_tasks=False, job=True)


def run_own_tasks(jobs: int, work: Work) -> float:
    """The same with the workers started in a nursery of the service's own."""
    return _run_service(jobs, work, own_tasks=True, job=True)


def run_intake_only(jobs: int, work: Work) -> float:
    """The workers of ``run_nursery_down`` reading through ``ctx.intake()``, with no job block."""
    return _run_service(jobs, work, own_tasks=False, job=False)


def _run_service(jobs: int, work: Work, *, own_tasks: bool, job: bool) -> float:
    send, receive = trio.open_memory_channel[int](0)
    sup = nd.Supervisor(name="bench")
    timing: dict[str, float] = {}

    @sup.service(restart="temporary")
    async def workers(ctx: nd.ServiceContext) -> None:
        async def worker() -> None:
            async for item in ctx.intake(receive):
                async with ctx.job(item):
                    work()

        async def intake_only() -> None:
            async for _ in ctx.intake(receive):
                work()

        async with trio.open_nursery() as nursery:
            ctx.ready()
            timing["started"] = clock()
            nursery.start_soon(_produce, send, jobs)
            if own_tasks:
                for _ in range(WORKERS):
                    nursery.start_soon(worker)
            else:
                await ctx.run_workers(WORKERS, worker if job else intake_only)
        timing["ended"] = clock()

    async def main() -> None:
        async with nd.open_supervisor(sup):
            await sup.wait_finished()

    trio.run(main)
    completed = sup.snapshot()["services"][0]["completed"]
    if job and completed != jobs:
        raise RuntimeError(f"nursery_down side completed {completed} of {jobs} jobs")
    return timing["ended"] - timing["started"]


@dataclass
class Result:
    label: str
    goal: float
    rates: dict[Side, float]  # median jobs per second of each side
    ratios: dict[Side, float]  # median over rounds of the side's rate / the raw rate

    def overhead_us(self, side: Side) -> float:
        return (1 / self.ratios[side] - 1) / self.rates[run_raw] * 1e6

    def cell(self, side: Side) -> str:
        return (
            f"{self.rates[side]:,.0f} ({self.ratios[side]:.2f}x, {self.overhead_us(side):.1f} us)"
        )


SIDES: list[Side] = [run_raw, run_intake_only, run_raw_shielded, run_nursery_down, run_own_tasks]


def measure(label: str, work: Work, jobs: int, rounds: int, goal: float) -> Result:
    rates: dict[Side, list[float]] = {side: [] for side in SIDES}
    for side in SIDES:
        side(jobs // 10, work)  # warm-up: caches, CPU frequency
    for round_ in range(rounds):
        # Alternate the order, so a drift in machine speed hits every side alike.
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            gc.collect()
            rates[side].append(jobs / side(jobs, work))
    raw = rates[run_raw]
    return Result(
        label,
        goal,
        {side: statistics.median(rates[side]) for side in SIDES},
        {
            side: statistics.median(a / b for a, b in zip(rates[side], raw, strict=True))
            for side in SIDES
        },
    )


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
    loops = calibrate()
    results = [
        measure("trivial", trivial, int(20_000 * args.scale), args.rounds, 0.65),
        # Short runs of slow jobs are noisier (one round's ratio varies by +-10% on a
        # shared 2-core machine): four times the rounds.
        measure("100 us of work", busy, int(3_000 * args.scale), 4 * args.rounds, 0.95),
    ]
    unit = "CPU-second" if args.clock == "cpu" else "second"
    print(
        f"{WORKERS} workers, one unbuffered memory channel, jobs per {unit} (median ratio to "
        f"the raw pool in the same round, overhead per job); {args.rounds} rounds of trivial "
        f"jobs and {4 * args.rounds} of 100 us jobs (Python {sys.version.split()[0]}, "
        f"trio {trio.__version__}); the work loop runs {loops:,} iterations\n"
    )
    print(
        "| jobs | raw pool | intake only | raw + shield per job | intake + job, ctx.run_workers "
        "| intake + job, own tasks | goal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        met = "met" if r.ratios[run_nursery_down] >= r.goal else "missed"
        print(
            f"| {r.label} | {r.rates[run_raw]:,.0f} | {r.cell(run_intake_only)} "
            f"| {r.cell(run_raw_shielded)} "
            f"| {r.cell(run_nursery_down)} | {r.cell(run_own_tasks)} "
            f"| >= {r.goal:.2f}x ({met}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
