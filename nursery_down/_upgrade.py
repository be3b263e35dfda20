"""Self-upgrade: the next generation takes over the sockets, then this one drains.

The protocol (the Go service runner's, after tableflip):

1. One upgrade at a time, and only while this process is RUNNING and its own
   predecessor has exited.
2. The program is run again the way it was started (``sys.orig_argv``, so ``-m`` and
   ``nursery-down run ...`` survive; argv and working directory can be overridden),
   with every :func:`~nursery_down.listener` socket passed by descriptor, a readiness
   pipe and a parent-alive pipe.
3. The new generation adopts the sockets it asks for, closes the others, starts every
   service and, once the whole app is RUNNING, writes ``ready`` to the readiness pipe.
4. Then this process announces the new main PID to systemd (``MAINPID=`` then
   ``READY=1``), drains under its grace and exits. Both generations serve (and consume)
   for the length of that drain; leases keep each job to one of them.
5. If the new generation exits, or is not ready within the timeout, this process kills
   and reaps it, keeps serving, and reports the failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import trio

from ._exceptions import ConfigurationError, InvalidTransitionError, UpgradeError
from ._listeners import (
    LISTENERS_ENV,
    close_unclaimed_listeners,
    encode_listeners,
    listener_descriptors,
)
from ._notify import hand_over
from ._supervisor import Supervisor
from ._validate import require_seconds

logger = logging.getLogger("nursery_down")

#: Set in the new generation: ``READY_FD,PARENT_FD,PARENT_PID``.
UPGRADE_ENV = "NURSERY_DOWN_UPGRADE"
#: Seconds the new generation has to become ready.
DEFAULT_TIMEOUT = 60.0


class Upgrader:
    """Starts the next generation of this program and hands it the sockets.

    One per program run (:func:`nursery_down.run` makes it). *argv* (default
    ``sys.orig_argv``) and *cwd* (default: the working directory at start) say how
    to run the new generation; *timeout* is how long it has to become ready.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        argv: Sequence[str] | None = None,
        cwd: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pid_file: str | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._pid_file = pid_file
        self._argv = list(argv) if argv is not None else list(sys.orig_argv)
        if not self._argv or not all(isinstance(part, str) and part for part in self._argv):
            raise ConfigurationError(
                f"cannot upgrade: the command to run the new generation is {self._argv!r}; "
                "pass upgrade_argv=[...]"
            )
        self._cwd = cwd if cwd is not None else os.getcwd()
        self._timeout = require_seconds("upgrade timeout", timeout, positive=True)
        self._pending: int | None = None
        # Set in a new generation until its predecessor exited.
        self._predecessor: int | None = None
        self._predecessor_gone = trio.Event()
        # Set in a generation started by an upgrade: (ready fd, parent fd, parent pid).
        self._handover = _read_handover()
        # What must be up before this generation says it is ready (its dashboard).
        self._ready_gates: list[trio.Event] = []
        #: The operator token the dashboard generated, kept by the next generation.
        self.dashboard_token: str | None = None

    @property
    def successor(self) -> bool:
        """True in a generation started by an upgrade (until it is ready or gave up)."""
        return self._handover is not None

    def hold_ready_until(self, gate: trio.Event) -> None:
        """Do not say ready to the previous generation before *gate* is set."""
        self._ready_gates.append(gate)

    @property
    def predecessor(self) -> int | None:
        """The pid of the previous generation while it still drains, else None."""
        return None if self._predecessor_gone.is_set() else self._predecessor

    # -- the new generation's side --------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """In a generation started by an upgrade: say ready once the app runs, then
        watch the predecessor until it exits. Elsewhere: return at once."""
        handover = self._handover
        if handover is None:
            self._predecessor_gone.set()
            task_status.started()
            return
        ready_fd, parent_fd, parent_pid = handover
        self._predecessor = parent_pid
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_predecessor, parent_fd, parent_pid)
            await self._report_ready(ready_fd)

    async def _report_ready(self, ready_fd: int) -> None:
        supervisor = self._supervisor
        async with trio.lowlevel.FdStream(ready_fd) as pipe:
            await supervisor.wait_app_state("running", "draining", "stopped")
            for gate in self._ready_gates:
                await gate.wait()
            if supervisor.app_state != "running":
                return  # drained while starting: never ready; the old one keeps serving
            closed = close_unclaimed_listeners()
            if closed:
                logger.info("closed inherited sockets nobody asked for: %s", ", ".join(closed))
            try:
                await pipe.send_all(f"ready {os.getpid()}\n".encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                logger.warning("the previous generation went away before we were ready")
                return
        supervisor.announce(  # the runner reports on the app
            f"upgrade: this generation (pid {os.getpid()}) is ready; the previous one "
            f"(pid {self._predecessor}) drains",
            upgrade="ready",
        )

    async def _watch_predecessor(self, parent_fd: int, parent_pid: int) -> None:
        async with trio.lowlevel.FdStream(parent_fd) as pipe:
            try:
                while await pipe.receive_some(64):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._predecessor_gone.set()
        if self._supervisor.app_state != "stopped":
            self._supervisor.announce(
                f"upgrade: the previous generation (pid {parent_pid}) has exited",
                upgrade="predecessor exited",
            )

    # -- the old generation's side --------------------------------------------------------

    async def upgrade(self, actor: str) -> int:
        """Start the next generation; once it is ready, drain this one.

        Returns when the new generation is ready (this one is then draining). Raises
        :class:`InvalidTransitionError` when an upgrade cannot start now and
        :class:`UpgradeError` when the new generation failed (this one keeps serving).
        """
        supervisor = self._supervisor
        if supervisor.app_state != "running":
            raise InvalidTransitionError(
                f"cannot upgrade while the app is {supervisor.app_state}: wait until it runs"
            )
        if self._pending is not None:
            raise InvalidTransitionError(
                f"an upgrade is already under way (new generation pid {self._pending})"
            )
        if self.predecessor is not None:
            raise InvalidTransitionError(
                f"cannot upgrade yet: the previous generation (pid {self.predecessor}) is "
                "still draining"
            )
        ready_read, ready_write = os.pipe()
        alive_read, alive_write = os.pipe()
        listeners = listener_descriptors()
        environment = dict(os.environ)
        environment[LISTENERS_ENV] = encode_listeners(listeners)
        environment[UPGRADE_ENV] = f"{ready_write},{alive_read},{os.getpid()}"
        if "NURSERY_DOWN_TOKEN" not in environment and self.dashboard_token is not None:
            # The browser's session must stay valid in the new generation.
            environment["NURSERY_DOWN_TOKEN"] = self.dashboard_token
        try:
            process = await trio.lowlevel.open_process(
                self._argv,
                cwd=self._cwd,
                env=environment,
                pass_fds=(*listeners.values(), ready_write, alive_read),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            for fd in (ready_read, ready_write, alive_read, alive_write):
                os.close(fd)
            raise UpgradeError(
                f"cannot start the new generation ({' '.join(self._argv)}): {exc.strerror}; "
                "this process keeps serving"
            ) from None
        os.close(ready_write)
        os.close(alive_read)
        # Kept open until this process exits: its end tells the child we are gone.
        _parent_alive_pipes.append(alive_write)
        self._pending = process.pid
        supervisor.announce(
            f"upgrade asked by {actor}: started the new generation (pid {process.pid})",
            upgrade="started",
            pid=process.pid,
        )
        try:
            outcome = await self._wait_ready(ready_read)
        except BaseException:
            # Cancelled (the program is ending): the new generation must not outlive us
            # unannounced.
            await _kill_and_reap(process)
            raise
        finally:
            self._pending = None
        if outcome != "ready":
            # A new generation that closed its pipe is exiting: let it finish, so that
            # its exit code says why.
            await _kill_and_reap(process, wait=5.0 if outcome == "exited" else 0.0)
            code = process.returncode
            if outcome == "timeout":
                reason = f"was not ready within {self._timeout:g} s and was killed"
            elif outcome == "draining":
                reason = "was killed: this process began to drain before it was ready"
            elif code is not None and code < 0:
                reason = f"was killed by {signal.Signals(-code).name} before it was ready"
            else:
                reason = f"exited with code {code} before it was ready"
            after = (
                "this process drains as asked"
                if outcome == "draining"
                else ("this process keeps serving")
            )
            message = f"upgrade failed: the new generation (pid {process.pid}) {reason}; {after}"
            logger.error("%s", message)
            supervisor.announce(message, upgrade="failed", pid=process.pid)
            raise UpgradeError(message)
        if self._pid_file is not None:
            write_pid_file(self._pid_file, process.pid)
        _announce_main_pid(process.pid)
        supervisor.announce(
            f"upgrade: the new generation (pid {process.pid}) is ready; draining this one",
            upgrade="handed over",
            pid=process.pid,
        )
        supervisor.drain_nowait(actor=f"upgrade (new generation pid {process.pid})")
        # Reaped when it exits, so that it never lingers as a zombie of ours.
        return process.pid

    async def _wait_ready(self, ready_read: int) -> str:
        """``"ready"``, ``"exited"`` (the pipe closed first), ``"timeout"`` or
        ``"draining"`` (this process began to drain: the upgrade is called off)."""
        outcome = "timeout"
        async with trio.lowlevel.FdStream(ready_read) as pipe, trio.open_nursery() as race:

            async def read() -> None:
                nonlocal outcome
                outcome = "ready" if await _read_ready(pipe) else "exited"
                race.cancel_scope.cancel()

            async def watch_drain() -> None:
                nonlocal outcome
                await self._supervisor.wait_app_state("draining", "stopped")
                outcome = "draining"
                race.cancel_scope.cancel()

            race.cancel_scope.deadline = trio.current_time() + self._timeout
            race.start_soon(read)
            race.start_soon(watch_drain)
        return outcome


async def _read_ready(pipe: trio.lowlevel.FdStream) -> bool:
    """True once the new generation wrote ``ready``; False if it closed the pipe first."""
    received = b""
    while b"\n" not in received:
        chunk = await pipe.receive_some(256)
        if not chunk:  # the child closed its end: it exited (or closed it) unready
            return False
        received += chunk
    return received.startswith(b"ready ")


#: The write ends of parent-alive pipes: held open for the whole life of the process.
_parent_alive_pipes: list[int] = []


def write_pid_file(path: str, pid: int) -> None:
    """Replace the PID file at *path* atomically: a reader sees the old or the new pid."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as file:
            file.write(f"{pid}\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        logger.warning("cannot write the PID file %s: %s", path, exc.strerror or exc)


def remove_pid_file(path: str) -> None:
    """Remove the PID file at *path* if it still names this process."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as file:
            if int(file.read().strip()) != os.getpid():
                return  # a new generation owns it now
        os.unlink(path)


def _read_handover() -> tuple[int, int, int] | None:
    text = os.environ.pop(UPGRADE_ENV, "")
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        logger.warning("ignoring %s=%r: not READY_FD,PARENT_FD,PARENT_PID", UPGRADE_ENV, text[:80])
        return None
    ready_fd, parent_fd, parent_pid = (int(part) for part in parts)
    return ready_fd, parent_fd, parent_pid


def _announce_main_pid(pid: int) -> None:
    """Tell systemd the new main PID before this process exits (else the unit stops)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    hand_over(address, pid)


async def _kill_and_reap(process: trio.Process, *, wait: float = 0.0) -> None:
    """Reap *process*, killing it if it has not exited within *wait* seconds."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(wait):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        with trio.move_on_after(10):
            await process.wait()
