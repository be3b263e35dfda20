"""Self-upgrade: the next generation takes over the sockets, then this one drains.

The protocol (the Go service runner's, after tableflip):

1. One upgrade at a time, and only while this process is RUNNING and its own
   predecessor has exited.
2. The program is run again the way it was started (``sys.orig_argv``, so ``-m`` and
   ``nursery-down run ...`` survive; argv and working directory can be overridden),
   with every :func:`~nursery_down.listener` socket passed by descriptor, a readiness
   pipe and a parent-alive pipe.
3. The new generation adopts the sockets it asks for, closes the others, starts every
   service and, once the app is ready for work (as ``/readyz`` says), writes ``ready``
   to the readiness pipe; if a service that counts for readiness FAILED, it writes
   ``failed WHY`` instead and drains at once.
4. Then this process announces the new main PID to systemd (``MAINPID=`` then
   ``READY=1``), drains under its grace and exits. Both generations serve (and consume)
   for the length of that drain; leases keep each job to one of them. Its dashboard
   stops accepting at once, so that browsers follow to the new generation.
5. If the new generation gives up or exits, or is not ready within the timeout (then
   it gets SIGTERM), this process gives it :data:`EXIT_PATIENCE` seconds to drain,
   kills and reaps it, keeps serving, and reports the failure.

Over the parent-alive pipe the old generation tells the new one who asked for the
upgrade and, while it drains, its state and in-flight jobs (:mod:`._generations`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import outcome
import trio

from ._exceptions import (
    ConfigurationError,
    InvalidTransitionError,
    UpgradeError,
    describe_error,
)
from ._fleet import GENERATION_ENV, current_generation
from ._generations import (
    LINE_LIMIT,
    REPORT_INTERVAL,
    PreviousGeneration,
    drain_report,
    send_message,
    upgrade_request,
)
from ._listeners import (
    LISTENERS_ENV,
    close_unclaimed_listeners,
    encode_listeners,
    listener_descriptors,
)
from ._notify import hand_over
from ._reports import log_safe
from ._state import ServiceState
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
        #: Seconds a new generation has to become ready.
        self.timeout = require_seconds("upgrade timeout", timeout, positive=True)
        # True from the moment an upgrade is accepted until it ended: one at a time.
        self._busy = False
        self._pending: int | None = None
        # Set in a new generation: what it knows of the one it replaced.
        self._predecessor: PreviousGeneration | None = None
        self._predecessor_gone = trio.Event()
        # Set in the old generation once the new one is ready and this one drains.
        self._handed_over = trio.Event()
        # Where the old generation's reports run (open while serve() runs).
        self._nursery: trio.Nursery | None = None
        # Set in a generation started by an upgrade: (ready fd, parent fd, parent pid).
        self._handover = _read_handover()
        # What must be up before this generation says it is ready (its dashboard).
        self._ready_gates: list[trio.Event] = []
        #: The operator token the dashboard generated, kept by the next generation.
        self.dashboard_token: str | None = None

    @property
    def successor(self) -> bool:
        """True in a generation started by an upgrade."""
        return self._handover is not None

    def hold_ready_until(self, gate: trio.Event) -> None:
        """Do not say ready to the previous generation before *gate* is set."""
        self._ready_gates.append(gate)

    @property
    def predecessor(self) -> int | None:
        """The pid of the previous generation while it still drains, else None."""
        if self._predecessor is None or self._predecessor_gone.is_set():
            return None
        return self._predecessor.pid

    def previous_generation(self) -> dict[str, Any] | None:
        """The snapshot's ``previous_generation``: None unless this generation replaced
        one; then its pid, state (``running``, ``draining``, ``stopped``, ``exited``),
        who asked for the upgrade, its in-flight jobs and the time left in its grace."""
        return None if self._predecessor is None else self._predecessor.view()

    async def wait_handed_over(self) -> None:
        """Return once a new generation is ready and this one began to drain."""
        await self._handed_over.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: in a generation started by an upgrade, say ready once
        the app runs and follow the predecessor until it exits; in every generation,
        report this one's drain to its successor after an upgrade."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            handover = self._handover
            if handover is None:
                self._predecessor_gone.set()
            else:
                ready_fd, parent_fd, parent_pid = handover
                self._predecessor = PreviousGeneration(parent_pid)
                nursery.start_soon(self._watch_predecessor, parent_fd, self._predecessor)
                nursery.start_soon(self._report_ready, ready_fd)
            task_status.started()
            await trio.sleep_forever()

    async def _report_ready(self, ready_fd: int) -> None:
        supervisor = self._supervisor
        async with trio.lowlevel.FdStream(ready_fd) as pipe:
            await supervisor.wait_app_state("running", "draining", "stopped")
            for gate in self._ready_gates:
                await gate.wait()
            if not await self._wait_whole_app_ready():
                failures = self._failures()
                if failures is None:
                    return  # drained while starting: never ready; the old one keeps serving
                message = (
                    f"upgrade: this generation (pid {os.getpid()}) cannot take over: "
                    f"{failures}; it drains, and the previous one keeps serving"
                )
                logger.error("%s", message)
                supervisor.announce(message, upgrade="not ready")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await pipe.send_all(f"failed {failures}\n".encode())
                if supervisor.app_state == "running":
                    supervisor._drain_for_upgrade(
                        actor="upgrade (this generation cannot take over)"
                    )
                return
            closed = close_unclaimed_listeners()
            if closed:
                logger.info("closed inherited sockets nobody asked for: %s", ", ".join(closed))
            try:
                await pipe.send_all(f"ready {os.getpid()}\n".encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self._pid_file is not None:  # this one runs alone now: it is named
                    write_pid_file(self._pid_file, os.getpid())
                logger.warning("the previous generation went away before we were ready")
                return
        pid = self._predecessor.pid if self._predecessor is not None else "?"
        supervisor.announce(  # the runner reports on the app
            f"upgrade: this generation (pid {os.getpid()}) is ready; the previous one "
            f"(pid {pid}) drains",
            upgrade="ready",
        )

    async def _wait_whole_app_ready(self) -> bool:
        """True once the app is ready for work (:meth:`Supervisor.readiness`); False
        once it never will be: a service FAILED, or the app drains."""
        supervisor = self._supervisor
        with supervisor.subscribe() as changes:
            while self._failures() is None and supervisor.app_state == "running":
                if supervisor.readiness()["ready"]:
                    return True
                # Re-checked after each event: states, health and restarts publish one.
                if await anext(changes, None) is None:
                    break
        return False

    def _failures(self) -> str | None:
        """What FAILED in this generation among the services that count for readiness
        (each and its last error), if anything: those never become ready by themselves."""
        failed = [
            f"service {record.name} FAILED"
            + (f" ({log_safe(record.last_error)})" if record.last_error else "")
            for record in self._supervisor._services.all()
            if record.spec.readiness and record.state is ServiceState.FAILED
        ]
        return "; ".join(failed) if failed else None

    async def _watch_predecessor(self, parent_fd: int, previous: PreviousGeneration) -> None:
        """Read the previous generation's messages until its end of the pipe closes."""
        supervisor = self._supervisor
        async with trio.lowlevel.FdStream(parent_fd) as pipe:
            pending = b""
            try:
                while chunk := await pipe.receive_some(LINE_LIMIT):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    if len(pending) > LINE_LIMIT:
                        pending = b""  # not a message of ours: drop it
                    for line in lines:
                        said = previous.receive(line)
                        if said is not None:
                            supervisor.announce(said, upgrade="asked", pid=previous.pid)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        previous.exited = True
        self._predecessor_gone.set()
        if supervisor.app_state != "stopped":
            code = previous.exit_code
            how = "" if code is None else f" (its drain ended with exit code {code})"
            supervisor.announce(
                f"upgrade: the previous generation (pid {previous.pid}) has exited{how}",
                upgrade="predecessor exited",
                pid=previous.pid,
            )

    # -- the old generation's side --------------------------------------------------------

    async def upgrade(self, actor: str) -> int:
        """Start the next generation; once it is ready, drain this one.

        Returns when the new generation is ready (this one is then draining). Raises
        :class:`InvalidTransitionError` when an upgrade cannot start now and
        :class:`UpgradeError` when the new generation failed (this one keeps serving).
        The upgrade runs in a task of its own: a caller cancelled meanwhile (an HTTP
        client that went away) leaves it running to its end.
        """
        self._refuse_now()
        result: outcome.Outcome[int] | None = None
        done = trio.Event()

        async def upgrade_in_background() -> None:
            nonlocal result
            try:
                result = outcome.Value(await self._upgrade(actor))
            except Exception as exc:
                result = outcome.Error(exc)
                if not isinstance(exc, UpgradeError):  # those said so themselves
                    message = f"upgrade failed: {describe_error(exc)}; this process keeps serving"
                    logger.error("%s", message, exc_info=exc)
                    self._supervisor.announce(message, upgrade="failed")
            finally:
                self._busy = False
                done.set()

        nursery = self._nursery
        self._busy = True  # before any checkpoint: a second request at once is refused
        try:
            if nursery is None:  # not serving (nothing runs in the background): inline
                await upgrade_in_background()
            else:
                nursery.start_soon(upgrade_in_background, name="upgrade")
        except BaseException:
            self._busy = False  # never started
            raise
        await done.wait()
        if result is None:
            raise UpgradeError("the upgrade was called off: this program is ending")
        return result.unwrap()

    def _refuse_now(self) -> None:
        """Raise :class:`InvalidTransitionError` if an upgrade cannot start now."""
        supervisor = self._supervisor
        if supervisor.app_state != "running":
            raise InvalidTransitionError(
                f"cannot upgrade while the app is {supervisor.app_state}: wait until it runs"
            )
        if self._busy:
            pending = "" if self._pending is None else f" (new generation pid {self._pending})"
            raise InvalidTransitionError(f"an upgrade is already under way{pending}")
        if os.getpid() == 1:
            raise InvalidTransitionError(
                "cannot upgrade: this process is PID 1 (a container's main process), and "
                "when it exits the kernel ends every process of the container, the new "
                "generation too; deploy a new container instead (a rolling update)"
            )
        if self.predecessor is not None:
            raise InvalidTransitionError(
                f"cannot upgrade yet: the previous generation (pid {self.predecessor}) is "
                "still draining"
            )

    async def _upgrade(self, actor: str) -> int:
        supervisor = self._supervisor
        ready_read, ready_write = os.pipe()
        alive_read, alive_write = os.pipe()
        listeners = listener_descriptors()
        environment = dict(os.environ)
        environment[LISTENERS_ENV] = encode_listeners(listeners)
        environment[UPGRADE_ENV] = f"{ready_write},{alive_read},{os.getpid()}"
        environment[GENERATION_ENV] = str(current_generation() + 1)
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
            message = (
                f"upgrade failed: cannot start the new generation ({' '.join(self._argv)}): "
                f"{exc.strerror}; this process keeps serving"
            )
            logger.error("%s", message)
            supervisor.announce(message, upgrade="failed")
            raise UpgradeError(message) from None
        os.close(ready_write)
        os.close(alive_read)
        # Kept open until this process exits: its end tells the child we are gone.
        _parent_alive_pipes.append(alive_write)
        send_message(alive_write, upgrade_request(actor, process.pid))
        self._pending = process.pid
        supervisor.announce(
            f"upgrade asked by {actor}: started the new generation (pid {process.pid})",
            upgrade="started",
            pid=process.pid,
        )
        try:
            ended, detail = await self._wait_ready(ready_read)
        except BaseException:
            # Cancelled (the program is ending): the new generation must not outlive us
            # unannounced.
            await _kill_and_reap(process)
            raise
        finally:
            self._pending = None
        if ended != "ready":
            # A new generation that gave up or closed its pipe is exiting (draining):
            # let it finish, so that it gives back its work and its exit code says why.
            # One told to stop (not ready in time, or called off) may already serve
            # connections on the shared sockets: SIGTERM drains them first.
            if ended in ("timeout", "draining"):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            # (Its drain begins after its pre-drain delay: the same as ours, as a rule.)
            await _kill_and_reap(process, wait=EXIT_PATIENCE + supervisor.pre_drain)
            code = process.returncode
            how = "was killed" if code is None or code < 0 else f"exited with code {code}"
            if ended == "failed":
                reason = f"could not take over: {detail} (it {how})"
            elif ended == "timeout":
                reason = f"was not ready within {self.timeout:g} s and was stopped (it {how})"
            elif ended == "draining":
                reason = f"was stopped: this process began to drain before it was ready (it {how})"
            elif code is not None and code < 0:
                reason = f"was killed by {signal.Signals(-code).name} before it was ready"
            else:
                reason = f"exited with code {code} before it was ready"
            after = (
                "this process drains as asked"
                if ended == "draining"
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
        supervisor._drain_for_upgrade(actor=f"upgrade (new generation pid {process.pid})")
        self._handed_over.set()
        if self._nursery is not None:
            self._nursery.start_soon(self._report_drain, alive_write)
        return process.pid

    async def _report_drain(self, fd: int) -> None:
        """Tell the new generation how this one's drain goes, until it stopped."""
        supervisor = self._supervisor
        try:
            while supervisor.app_state != "stopped":
                if not send_message(fd, drain_report(supervisor.snapshot())):
                    return
                with trio.move_on_after(REPORT_INTERVAL):
                    await supervisor.wait_app_state("stopped")
        finally:
            # The last word, with the exit code, even when the program is ending.
            send_message(fd, drain_report(supervisor.snapshot()))

    async def _wait_ready(self, ready_read: int) -> tuple[str, str]:
        """How the wait for the new generation ended, and what it said: ``"ready"``,
        ``"failed"`` (it cannot take over, and says why), ``"exited"`` (the pipe closed
        first), ``"timeout"`` or ``"draining"`` (this process began to drain: the
        upgrade is called off)."""
        ended, detail = "timeout", ""
        async with trio.lowlevel.FdStream(ready_read) as pipe, trio.open_nursery() as race:

            async def read() -> None:
                nonlocal ended, detail
                line = await _read_line(pipe)
                if line.startswith("ready "):
                    ended = "ready"
                elif line.startswith("failed "):
                    ended, detail = "failed", log_safe(line.removeprefix("failed "))
                else:
                    ended = "exited"
                race.cancel_scope.cancel()

            async def watch_drain() -> None:
                nonlocal ended
                await self._supervisor.wait_app_state("draining", "stopped")
                ended = "draining"
                race.cancel_scope.cancel()

            race.cancel_scope.deadline = trio.current_time() + self.timeout
            race.start_soon(read)
            race.start_soon(watch_drain)
        return ended, detail


#: Seconds a new generation that gave up, or was told to stop, is given to drain and
#: exit (after its pre-drain delay) before it is killed.
EXIT_PATIENCE = 5.0
#: Seconds a killed generation is given to be reaped.
REAP_PATIENCE = 10.0
#: The most an upgrade's answer can come after its timeout and the pre-drain delay.
ANSWER_MARGIN = EXIT_PATIENCE + REAP_PATIENCE


async def _read_line(pipe: trio.lowlevel.FdStream) -> str:
    """The new generation's first line on the ready pipe (``ready PID`` or ``failed
    WHY``); empty if it closed the pipe first (it exited unready)."""
    received = b""
    while b"\n" not in received and len(received) < LINE_LIMIT:
        chunk = await pipe.receive_some(256)
        if not chunk:
            return ""
        received += chunk
    return received.split(b"\n", 1)[0].decode("utf-8", "replace")


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
        with trio.move_on_after(REAP_PATIENCE):
            await process.wait()
