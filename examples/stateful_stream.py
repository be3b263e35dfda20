"""A long-running stream job that keeps state, checkpoints it, and hands over cleanly.

The stream processor folds an endless stream of numbered events into a running
total. It holds a lock file while it runs, so that only one instance processes the
stream, and checkpoints its state after every window of events. On a drain it
finishes the current window, writes its state and removes the lock, so a second
instance waiting for the lock takes over at once and resumes from the checkpoint:
no event is processed twice and none is skipped.

    python examples/stateful_stream.py            # Ctrl-C or SIGTERM to hand over
    STREAM_DIR=/tmp/s python examples/stateful_stream.py

Settings (environment): STREAM_DIR (where the checkpoint and the lock live,
default ./stream-state), STREAM_EVENT_SECONDS (time per event, default 0.01),
STREAM_WINDOW (events per checkpoint, default 20), STREAM_DASHBOARD (HOST:PORT).

With STREAM_LOCK_DSN (a PostgreSQL connection string) the lock is a
``PostgresLock`` instead of the lock file: a lease in the database, released on a
drain and expiring STREAM_LOCK_LEASE seconds (default 5) after a killed holder's
last renewal, so the instances may run on different machines (with the checkpoint on
storage they share). It needs ``pip install 'nursery-down[postgres]'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

import nursery_down as nd

STATE_DIR = Path(os.environ.get("STREAM_DIR", "stream-state"))
EVENT_SECONDS = float(os.environ.get("STREAM_EVENT_SECONDS", "0.01"))
WINDOW = int(os.environ.get("STREAM_WINDOW", "20"))
LOCK_DSN = os.environ.get("STREAM_LOCK_DSN", "")
LOCK_LEASE = float(os.environ.get("STREAM_LOCK_LEASE", "5"))


@dataclass
class StreamState:
    """Everything the processor must not lose: where it is, and what it has folded."""

    position: int = 0  # the next event to process
    total: int = 0
    windows: int = 0


class Checkpoint:
    """The state on disk, replaced atomically so a crash never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> StreamState:
        try:
            return StreamState(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return StreamState()

    def save(self, state: StreamState) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(state)))
        os.replace(partial, self.path)


class LockFile:
    """Only one instance processes the stream: the holder's pid is in the lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def acquire(self, *, poll: float = 0.05) -> None:
        """Take the lock, waiting while a live instance holds it; a dead holder's is taken over."""
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._holder_alive():
                    self.path.unlink(missing_ok=True)
                    continue
                await trio.sleep(poll)
                continue
            with os.fdopen(fd, "w") as lock:
                lock.write(str(os.getpid()))
            return

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def _holder_alive(self) -> bool:
        try:
            pid = int(self.path.read_text() or "0")
        except (FileNotFoundError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return pid != os.getpid()


@asynccontextmanager
async def exclusive() -> AsyncIterator[None]:
    """Only one instance processes the stream: hold the lock file, or the PostgresLock."""
    if LOCK_DSN:
        from nursery_down.queues import PostgresLock

        async with PostgresLock(LOCK_DSN, "stateful-stream", lease=LOCK_LEASE).hold():
            yield
        return
    lock = LockFile(STATE_DIR / "processor.lock")
    await lock.acquire()
    try:
        yield
    finally:
        lock.release()


async def stream_from(position: int) -> AsyncGenerator[list[int], None]:
    """The upstream: windows of consecutive event numbers, starting at *position*."""
    while True:
        window = list(range(position, position + WINDOW))
        position += WINDOW
        yield window


sup = nd.Supervisor("stateful-stream", grace=10.0)


@sup.service
async def processor(ctx: nd.ServiceContext) -> None:
    """Fold windows of events into the state; checkpoint each; hand over on drain."""
    await trio.Path(STATE_DIR).mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(STATE_DIR / "checkpoint.json")
    async with exclusive():
        state = checkpoint.load()
        try:
            print(f"resuming at event {state.position}, total {state.total}", flush=True)
            ctx.ready()
            source = stream_from(state.position)
            async for window in ctx.intake(source):
                # One window is one job: shielded, so a drain lets it finish and the
                # hand-over lands on a window boundary.
                async with ctx.job(f"window-{state.windows}", first=window[0]):
                    for event in window:
                        await trio.sleep(EVENT_SECONDS)
                        # Both fields change together, with no checkpoint between them,
                        # so the state is consistent even if the grace runs out mid-window.
                        state.total += event
                        state.position = event + 1
                    state.windows += 1
                    checkpoint.save(state)
            await source.aclose()
            print(f"handing over at event {state.position}, total {state.total}", flush=True)
        finally:
            # Dump the state before the lock goes, even after a hard cancel.
            checkpoint.save(state)


if __name__ == "__main__":
    raise SystemExit(nd.run(sup, dashboard=os.environ.get("STREAM_DASHBOARD") or None))
