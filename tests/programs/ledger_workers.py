"""A target program for the signal tests: a producer feeding 20 workers, with a ledger.

Run it the way an operator would::

    LEDGER_PATH=/tmp/ledger nursery-down run tests/programs/ledger_workers.py:sup

Service ``workers`` runs the worker tasks, each taking keys through ``ctx.intake()``
and running one ``ctx.job()`` per key; service ``feed`` (started after ``workers``,
so stopped before it) hands out fresh keys. Every line of the ledger is written
and flushed at once, with ``time.time()`` so another process can compare times:

- ``up <service> <time>`` each time a service is ready (again after a restart);
- ``start <key> <time> <seconds>`` when a job block was entered, with its planned length;
- ``done <key> <time>`` when it finished its work;
- ``cut <key> <time>`` when it was hard-cancelled.

Settings, from the environment:

- ``LEDGER_PATH`` (required): the ledger file, appended to;
- ``LEDGER_SNAPSHOT``: write ``sup.snapshot()`` as JSON here when the process exits;
- ``LEDGER_JOB_MIN`` / ``LEDGER_JOB_MAX``: job length range in seconds (0.3 / 1.2);
- ``LEDGER_GRACE``: the supervisor's grace in seconds (30);
- ``LEDGER_WORKERS``: number of worker tasks (20);
- ``LEDGER_PLACEMENT``: ``tasks`` (default) starts the workers in a nursery of the
  service's own, ``run_workers`` with ``ctx.run_workers``;
- ``LEDGER_MAX_JOBS``: stop handing out keys after this many (unbounded; 0 = idle);
- ``LEDGER_SEED``: seed of the job lengths.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import time
from typing import Any

import trio

import nursery_down as nd


def _setting(name: str, default: float) -> float:
    text = os.environ.get(name)
    return default if text is None or text == "" else float(text)


JOB_MIN = _setting("LEDGER_JOB_MIN", 0.3)
JOB_MAX = _setting("LEDGER_JOB_MAX", 1.2)
WORKERS = int(_setting("LEDGER_WORKERS", 20))
PLACEMENT = os.environ.get("LEDGER_PLACEMENT") or "tasks"
MAX_JOBS = _setting("LEDGER_MAX_JOBS", float("inf"))
_seed = os.environ.get("LEDGER_SEED")
_rng = random.Random(int(_seed) if _seed else None)


class Ledger:
    """An append-only file of one-line records, each written with a single system call."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *fields: object) -> None:
        os.write(self._fd, (" ".join(str(f) for f in fields) + "\n").encode())


ledger = Ledger(os.environ["LEDGER_PATH"])
sup = nd.Supervisor(name="ledger", grace=_setting("LEDGER_GRACE", 30.0))

# Keys travel from feed to workers through one unbuffered channel: a key is handed
# over only when a worker takes it. It outlives restarts of either service.
_send_keys, _receive_keys = trio.open_memory_channel[str](0)
_issued = 0


@sup.service(name="workers")
async def workers(ctx: nd.ServiceContext) -> None:
    async def work() -> None:
        async for key in ctx.intake(_receive_keys):
            async with ctx.job(key):
                seconds = _rng.uniform(JOB_MIN, JOB_MAX)
                ledger.write("start", key, f"{time.time():.6f}", f"{seconds:.6f}")
                try:
                    await trio.sleep(seconds)
                except trio.Cancelled:
                    ledger.write("cut", key, f"{time.time():.6f}")
                    raise
                ledger.write("done", key, f"{time.time():.6f}")

    async with trio.open_nursery() as nursery:
        if PLACEMENT == "run_workers":
            nursery.start_soon(ctx.run_workers, WORKERS, work)
        else:
            for number in range(WORKERS):
                nursery.start_soon(work, name=f"worker {number}")
        ctx.ready()
        ledger.write("up", ctx.name, f"{time.time():.6f}")


@sup.service(name="feed", after=["workers"])
async def feed(ctx: nd.ServiceContext) -> None:
    async def produce() -> None:
        global _issued
        while _issued < MAX_JOBS:
            await _send_keys.send(f"job-{_issued}")
            _issued += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        ctx.ready()
        ledger.write("up", ctx.name, f"{time.time():.6f}")
        await ctx.wait_draining()
        nursery.cancel_scope.cancel()


def _write_snapshot() -> None:
    path = os.environ.get("LEDGER_SNAPSHOT")
    if path:
        snapshot: dict[str, Any] = sup.snapshot()
        with open(path, "w") as file:
            json.dump(snapshot, file)


atexit.register(_write_snapshot)
