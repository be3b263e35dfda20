"""A fleet under chaos: three worker processes on one PostgreSQL queue, a producer
throughout, SIGTERM, SIGKILL and SIGSTOP at random instants, the database restarted
once. Then: nothing lost, every duplicate explained by a kill or a lost lease, and
the jobs of every killed process running again elsewhere within the target.

The instants come from a seeded random generator (``ND_FLEET_CHAOS_SEED`` replays a
run; the seed is in the failure message). Times are wall-clock: the queue's history
is written with the database's clock, on this same machine.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import trio

from nursery_down.queues import PostgresQueue
from nursery_down.testing import (
    History,
    JobEvent,
    PostgresServer,
    ProcessExit,
    SignalSent,
    check_history,
)

TARGET = str(Path(__file__).resolve().parent / "programs" / "fleet_worker.py") + ":sup"
#: Worker processes kept running.
WORKERS = 3
#: Seconds of chaos.
DURATION = 12.0
#: Seconds between two puts of the producer.
PUT_EVERY = 0.03
#: A stopped process stays stopped this long: longer than the workers' lease (1 s).
PAUSE = 2.0
#: The jobs of a SIGKILLed worker must run again elsewhere within this many seconds.
RESCUE_TARGET = 5.0
#: Bound on everything after the chaos (the queue emptying, the workers exiting).
PATIENCE = 60.0


async def test_a_fleet_loses_nothing_under_signals_and_a_database_restart(
    postgres_server: PostgresServer, postgres_dsn: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("ND_FLEET_CHAOS_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    signals: list[SignalSent] = []
    exits: list[ProcessExit] = []
    workers: dict[int, trio.Process] = {}
    log = (tmp_path / "workers.log").open("ab")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
    environment.update(FLEET_DSN=postgres_dsn, FLEET_JOB_SECONDS="0.2")
    queue = PostgresQueue(postgres_dsn, name="invoices", heartbeat=0.2, lease=1.0)
    restarted = False
    signal_kinds = (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP)
    chaos_kinds: set[str] = set()

    def send(process: trio.Process, signum: signal.Signals) -> None:
        signals.append(SignalSent(process.pid, signum.name, time.time()))
        process.send_signal(signum)

    async def keep_workers(nursery: trio.Nursery) -> None:
        async def run_one() -> None:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "nursery_down", "run", TARGET, "--no-dashboard"],
                env=environment,
                stdout=log,
                stderr=log,
            )
            workers[process.pid] = process
            code = await process.wait()
            exits.append(ProcessExit(process.pid, code, time.time()))
            del workers[process.pid]

        for _ in range(WORKERS):
            nursery.start_soon(run_one)
        while not stopping.is_set():  # a worker that ended is replaced, as a deploy would
            await trio.sleep(0.1)
            if stopping.is_set():
                break
            for _ in range(WORKERS - len(workers)):
                nursery.start_soon(run_one)

    async def produce(stop: trio.Event) -> None:
        while not stop.is_set():
            await queue.put({"at": time.time()})
            await trio.sleep(PUT_EVERY)

    async def chaos() -> None:
        nonlocal restarted
        ends = trio.current_time() + DURATION
        restart_at = trio.current_time() + DURATION / 2
        # Each kind of signal comes once, in a random order, before any comes again.
        first = list(signal_kinds)
        rng.shuffle(first)
        async with trio.open_nursery() as pauses:
            while trio.current_time() < ends:
                await trio.sleep(rng.uniform(0.4, 1.2))
                if not restarted and trio.current_time() >= restart_at:
                    restarted = True
                    await trio.to_thread.run_sync(postgres_server.restart)
                    continue
                live = [p for p in workers.values() if p.returncode is None]
                if not live:
                    continue
                process = rng.choice(live)
                action = first.pop() if first else rng.choice(signal_kinds)
                send(process, action)
                chaos_kinds.add(action.name)
                if action is signal.SIGSTOP:

                    async def resume(process: trio.Process = process) -> None:
                        await trio.sleep(PAUSE)
                        if process.returncode is None:
                            send(process, signal.SIGCONT)

                    pauses.start_soon(resume)

    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        stop_producing = trio.Event()
        nursery.start_soon(keep_workers, nursery)
        nursery.start_soon(produce, stop_producing)
        with trio.fail_after(DURATION + PATIENCE):
            await chaos()
        stop_producing.set()
        with trio.fail_after(PATIENCE):
            while True:  # the survivors finish what is left
                figures = await queue.statistics()
                if figures.queued == 0 and figures.leased == 0:
                    break
                await trio.sleep(0.2)
            nursery.cancel_scope.deadline = trio.current_time() + PATIENCE
            stopping.set()  # no more replacements: the last ones drain and exit
            told: set[int] = set()
            while workers:
                # (a worker that started in the instant the replacing stopped is told too)
                for process in [p for p in workers.values() if p.pid not in told]:
                    told.add(process.pid)
                    send(process, signal.SIGCONT)  # (a no-op unless it was stopped)
                    send(process, signal.SIGTERM)
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    log.close()

    rows = await queue.history()
    pending = frozenset(await queue.pending())
    await queue.aclose()
    history = History(
        events=tuple(JobEvent(*row) for row in rows),
        signals=tuple(signals),
        exits=tuple(exits),
        pending=pending,
    )
    report = check_history(history)
    about = f"seed {seed}; {report.describe()}"
    assert restarted, about
    assert len(report.enqueued) > DURATION / PUT_EVERY / 2, about
    assert report.lost == (), about
    assert report.unexpected == (), about
    assert report.unexplained_duplicates == (), about
    assert report.dead == frozenset(), about
    assert chaos_kinds == {"SIGTERM", "SIGKILL", "SIGSTOP"}, about

    # Orphans rescued within the target: each job a process held when it was killed is
    # claimed again by another process soon after.
    killed_at = {s.pid: s.time for s in signals if s.signal == "SIGKILL"}
    for pid, kill in killed_at.items():
        held = History(events=tuple(e for e in history.events if e.time <= kill)).in_flight(pid)
        for job in held:
            again = [
                e.time
                for e in history.events
                if e.job == job and e.event == "claim" and e.pid != pid and e.time > kill
            ]
            assert again, f"job {job} of killed pid {pid} never ran again; {about}"
            assert again[0] - kill <= RESCUE_TARGET, (
                f"job {job} ran again {again[0] - kill:.1f} s after the kill; {about}"
            )
    # Drains were clean: a worker sent SIGTERM (and not killed after) exited 0 or 3, or,
    # signalled while its interpreter still started (before it could own SIGTERM), died
    # of it without having taken a job.
    killed = set(killed_at)
    claimed_by = {e.pid for e in history.events if e.event == "claim"}
    for ended in exits:
        if ended.pid in killed:
            continue
        early = ended.returncode == -signal.SIGTERM and ended.pid not in claimed_by
        assert ended.returncode in (0, 3) or early, (
            f"pid {ended.pid} exited {ended.returncode}; {about}"
        )
