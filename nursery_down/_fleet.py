"""The fleet: processes that share a PostgreSQL database see and control each other.

Every process given a fleet database (``nd.run(sup, fleet=DSN)``, ``nursery-down run
--fleet DSN``, ``$NURSERY_DOWN_FLEET``, or by default the database of a
:class:`~nursery_down.queues.PostgresQueue` one of its worker pools uses) registers
itself in the table ``nd_fleet_processes`` and, every *interval* seconds, writes
there its state, its in-flight jobs and the figures of its PostgreSQL queues. A
process that stops writing for :data:`GONE_AFTER` intervals is shown as gone (its
jobs are orphans until the queue's sweeper hands them out again).

Actions on another process travel through the database too: a row in
``nd_fleet_commands`` and a ``NOTIFY``. Each process listens, carries out the
commands addressed to it with its supervisor's control methods (audited with who
asked, and from which process), and writes back what came of each. So no process's
port needs to be reachable from another.

The database never holds a process back: the fleet starts in the background, and
when the database is away a process logs it once, keeps running, and catches up
when it is back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from ._exceptions import (
    ConfigurationError,
    FleetError,
    FleetUnavailableError,
    InvalidTransitionError,
    NurseryDownError,
    UnknownProcessError,
)
from ._postgresql import (
    Handoff,
    OneConnection,
    close_quietly,
    first_line,
    import_driver,
    printable,
)
from ._validate import require_seconds
from .queues._source import closed_by_owner

if TYPE_CHECKING:
    import psycopg

    from ._supervisor import Supervisor

T = TypeVar("T")

logger = logging.getLogger("nursery_down")

#: The fleet's database, when neither ``fleet=`` nor ``--fleet`` name one.
FLEET_ENV: Final = "NURSERY_DOWN_FLEET"
#: A label of the running code (a release, a commit), shown on the fleet page.
VERSION_ENV: Final = "NURSERY_DOWN_VERSION"
#: How many upgrades led to this process (1 for a process started by hand).
GENERATION_ENV: Final = "NURSERY_DOWN_GENERATION"

#: Seconds between two reports of a process.
DEFAULT_INTERVAL: Final = 2.0
#: Overrides DEFAULT_INTERVAL for the processes started with it set.
FLEET_INTERVAL_ENV: Final = "NURSERY_DOWN_FLEET_INTERVAL"
#: The answer to a command its process stopped before taking (a refusal: 409).
NOT_CARRIED_OUT: Final = "refused: the process stopped before carrying it out"
#: Reports a process may miss before it is shown as gone.
GONE_AFTER: Final = 3
#: Seconds a process that stopped (or went away) stays listed.
KEEP_ENDED: Final = 3600.0
#: Seconds the last report (that this process stopped) may hold its exit.
FINAL_REPORT_LIMIT: Final = 2.0
#: Seconds :meth:`FleetMember.ask` waits for the target to say what came of a command.
ANSWER_WAIT: Final = 5.0
#: Jobs listed per service in a report (the oldest first).
REPORT_JOBS: Final = 20
#: What one process can ask of another.
ACTIONS: Final = ("drain", "start", "restart", "escalate", "upgrade")
#: Actions that name a service (the others may: without one they act on the whole app).
SERVICE_ONLY: Final = ("start",)

#: The layout of the fleet's tables; a newer one is refused rather than misread.
SCHEMA_VERSION: Final = 1
#: First key of the fleet's advisory lock ("ndf").
_LOCK_SPACE: Final = 0x6E6466
_CHANNEL: Final = "nd_fleet"

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS nd_fleet_meta (key text PRIMARY KEY, value text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS nd_fleet_processes (
        id text PRIMARY KEY,
        app text NOT NULL,
        host text NOT NULL,
        pid integer NOT NULL,
        version text NOT NULL,
        generation integer NOT NULL,
        state text NOT NULL,
        in_flight integer NOT NULL DEFAULT 0,
        exit_code integer,
        interval real NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        stopped_at timestamptz,
        report jsonb NOT NULL DEFAULT '{}'::jsonb)""",
    """CREATE TABLE IF NOT EXISTS nd_fleet_commands (
        id bigserial PRIMARY KEY,
        process_id text NOT NULL,
        action text NOT NULL,
        service text,
        actor text NOT NULL,
        asked_from text NOT NULL,
        asked_at timestamptz NOT NULL DEFAULT now(),
        taken_at timestamptz,
        result text)""",
    """CREATE INDEX IF NOT EXISTS nd_fleet_commands_waiting
        ON nd_fleet_commands (process_id) WHERE taken_at IS NULL""",
)


@dataclass(frozen=True, slots=True)
class FleetCommand:
    """One action asked of a process of the fleet."""

    id: int
    action: str
    service: str | None
    actor: str
    asked_from: str


class FleetMember:
    """This process's membership of a fleet: its reports, and the commands it obeys.

    Made by :func:`nursery_down.open_supervisor` when a fleet database is known;
    :meth:`view` and :meth:`ask` serve the dashboard's fleet page, from any process.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        dsn: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        sources: list[Any] | None = None,
    ) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError(
                "the fleet database must be a PostgreSQL connection string such as "
                f"'postgresql://user@host/dbname', got {dsn!r}"
            )
        self.interval = require_seconds("fleet interval", interval, positive=True)
        import_driver("the fleet")
        self._supervisor = supervisor
        self._database = OneConnection(
            dsn,
            purpose="fleet",
            unavailable=FleetUnavailableError,
            error=FleetError,
            connect_timeout=self.interval * 2,
            prepare=self._prepare_sync,
        )
        self._where = self._database.where
        #: This process in the fleet: a new id for each run (an upgrade makes a new one).
        self.id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.version = printable(os.environ.get(VERSION_ENV, ""))
        self.generation = current_generation()
        # The PostgreSQL queues whose figures the reports carry (statistics()).
        self._sources = list(sources or [])
        self._registered = False
        self._away = False
        self._wakeup = trio.Event()

    @property
    def name(self) -> str:
        """``host:pid``: how the fleet page and the audit lines name this process."""
        return f"{self.host}:{self.pid}"

    # -- this process's side ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report this process and obey its commands until cancelled; then write that it
        stopped (with its exit code). Never fails because of the database."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_forever)
                nursery.start_soon(self._listen_forever, nursery)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_REPORT_LIMIT):
                await self._report_once(final=True)

    async def _report_forever(self) -> None:
        supervisor = self._supervisor
        last_state = None
        while True:
            await self._report_once()
            last_state = supervisor.app_state
            with trio.move_on_after(self.interval):
                # Report at once when the app changes state (a drain began, it stopped).
                await supervisor.wait_app_state(
                    *(s for s in ("starting", "running", "draining", "stopped") if s != last_state)
                )

    async def _report_once(self, *, final: bool = False) -> None:
        supervisor = self._supervisor
        snapshot = supervisor.snapshot(max_jobs=REPORT_JOBS)
        queues = []
        for source in self._sources:
            if closed_by_owner(source):
                continue  # closed by the service that owns it: never opened again here
            try:
                figures = await source.statistics()
            except trio.ClosedResourceError:
                continue  # closed while its figures were read
            except NurseryDownError as exc:
                queues.append({"name": source.name, "error": printable(str(exc))})
            else:
                queues.append(
                    {
                        "name": source.name,
                        "queued": figures.queued,
                        "leased": figures.leased,
                        "done": figures.done,
                        "dead": figures.dead,
                    }
                )
        report = {
            "grace_deadline": snapshot["grace_deadline"],
            "services": [
                {
                    "name": service["name"],
                    "state": service["state"],
                    "in_flight": service["in_flight"],
                    "completed": service["completed"],
                    "failed": service["failed"],
                    "hard_cancelled": service["hard_cancelled"],
                    "restarts": service["restarts"],
                    "jobs": [
                        {"key": job["key"], "age": job["age"], "deadline": job["deadline"]}
                        for job in service["jobs"]
                    ],
                }
                for service in snapshot["services"]
            ],
            "queues": queues,
        }
        in_flight = sum(service["in_flight"] for service in snapshot["services"])
        state = "stopped" if final and snapshot["state"] != "stopped" else snapshot["state"]
        try:
            await self._call(
                self._report_sync,
                state,
                in_flight,
                snapshot["exit_code"],
                json.dumps(report, allow_nan=False),
                final,
            )
        except FleetUnavailableError as exc:
            if not self._away:
                self._away = True
                logger.warning("fleet: %s; this process keeps running and retries", exc)
            return
        if self._away:
            self._away = False
            logger.info("fleet: the database at %s answers again", self._where)

    async def _listen_forever(self, nursery: trio.Nursery) -> None:
        """Carry out the commands for this process: woken by NOTIFY, and every interval
        in any case (notifications sent while disconnected are lost)."""
        listener: psycopg.Connection[Any] | None = None
        try:
            while True:
                if listener is None:
                    handoff = Handoff()
                    try:
                        await trio.to_thread.run_sync(
                            self._listen_sync, handoff, abandon_on_cancel=True
                        )
                    except FleetUnavailableError:
                        pass
                    finally:
                        listener = handoff.take()
                if self._registered:
                    await self._obey_waiting(nursery)
                with trio.move_on_after(self.interval):
                    if listener is None:
                        await trio.sleep_forever()
                    elif not await _notified(listener):
                        close_quietly(listener)  # broken: poll until it is back
                        listener = None
        finally:
            close_quietly(listener)

    async def _obey_waiting(self, nursery: trio.Nursery) -> None:
        try:
            commands = await self._call(self._take_commands_sync)
        except FleetUnavailableError:
            return
        for command in commands:
            nursery.start_soon(self._obey, command)

    async def _obey(self, command: FleetCommand) -> None:
        supervisor = self._supervisor
        actor = f"{command.actor} via the fleet, from {command.asked_from}"
        service = command.service
        try:
            if command.action == "drain":
                await supervisor.drain(service, actor=actor)
            elif command.action == "start":
                if service is None:
                    raise InvalidTransitionError("start needs a service name")
                await supervisor.start(service, actor=actor)
            elif command.action == "restart":
                await supervisor.restart(service, actor=actor)
            elif command.action == "escalate":
                await supervisor.escalate(service, actor=actor)
            else:  # upgrade: said done once the new generation is ready
                new = await supervisor.upgrade(actor=actor)
                result = f"accepted: the new generation (pid {new}) is ready; this one drains"
                await self._answer(command, result)
                return
        except NurseryDownError as exc:
            result = f"refused: {exc}"
        else:
            result = "accepted"
        await self._answer(command, result)

    async def _answer(self, command: FleetCommand, result: str) -> None:
        try:
            # Shielded: a drain asked this way may end the program (and this task) at
            # once, and the one who asked must still learn that it was carried out.
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_REPORT_LIMIT):
                await self._call(self._answer_sync, command.id, printable(result))
        except FleetUnavailableError as exc:
            logger.warning("fleet: cannot record the result of command %d: %s", command.id, exc)

    # -- any process's side: the fleet page ------------------------------------------------

    async def view(self) -> dict[str, Any]:
        """Every process of the fleet and the figures of its queues, as plain JSON data.

        Raises :class:`FleetUnavailableError` when the database cannot be reached.
        """
        rows, now = await self._call(self._view_sync)
        processes = [_process_view(row, now) for row in rows]
        queues: dict[str, dict[str, Any]] = {}
        for process in sorted(processes, key=lambda p: p["heartbeat_age"], reverse=True):
            if process["state"] in ("stopped", "gone"):
                continue
            for queue in process["queues"]:
                queues[queue["name"]] = {**queue, "reported_by": process["name"]}
        return {
            "this": self.id,
            "interval": self.interval,
            "processes": processes,
            "queues": sorted(queues.values(), key=lambda q: q["name"]),
        }

    async def ask(
        self, process_id: str, action: str, service: str | None, *, actor: str
    ) -> dict[str, Any]:
        """Ask process *process_id* to carry out *action* (on *service*, or the whole
        app); wait up to :data:`ANSWER_WAIT` seconds for what came of it.

        Raises :class:`UnknownProcessError` for a process the fleet does not list,
        :class:`InvalidTransitionError` for one that stopped or is gone, and
        :class:`FleetUnavailableError` when the database cannot be reached.
        """
        if action not in ACTIONS:
            raise ConfigurationError(
                f"unknown fleet action {action!r}; choose one of {', '.join(ACTIONS)}"
            )
        if action in SERVICE_ONLY and not service:
            raise ConfigurationError(f"{action} needs a service name")
        if action == "upgrade" and service:
            raise ConfigurationError("upgrade acts on a whole process, not on one service")
        command_id = await self._call(
            self._ask_sync, process_id, action, service, printable(actor), self.name
        )
        result = None
        with trio.move_on_after(ANSWER_WAIT):
            while result is None:
                await trio.sleep(0.05)
                result = await self._call(self._result_sync, command_id)
        return {
            "command": command_id,
            "process": process_id,
            "action": action,
            "service": service,
            "result": result,
        }

    # -- the database (each *_sync method runs in a worker thread) ------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await self._database.call(function, *args)

    def _prepare_sync(self, connection: psycopg.Connection[Any]) -> None:
        """Create the fleet's tables if needed (one process at a time), check their layout."""
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SPACE,))
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO nd_fleet_meta VALUES ('schema', %s) ON CONFLICT DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            row = connection.execute(
                "SELECT value FROM nd_fleet_meta WHERE key = 'schema'"
            ).fetchone()
        version = int(row[0]) if row and str(row[0]).isdigit() else -1
        if version != SCHEMA_VERSION:
            raise FleetError(
                f"the fleet tables at {self._where} have layout {row[0] if row else None!r}, "
                f"this nursery_down reads layout {SCHEMA_VERSION}; upgrade nursery_down "
                "on this host"
            )

    def _listen_sync(self, handoff: Handoff) -> None:
        handoff.start()
        connection = self._database.connect_sync(application="nursery_down fleet listener")
        try:
            connection.execute(f"LISTEN {_CHANNEL}")
        except Exception as exc:
            close_quietly(connection)
            raise FleetUnavailableError(
                f"the fleet database at {self._where} cannot be reached "
                f"({first_line(exc, self._database.dsn)})"
            ) from None
        handoff.give(connection)

    def _report_sync(
        self,
        connection: psycopg.Connection[Any],
        state: str,
        in_flight: int,
        exit_code: int | None,
        report: str,
        final: bool,
    ) -> None:
        with connection.transaction():
            connection.execute(
                """INSERT INTO nd_fleet_processes
                       (id, app, host, pid, version, generation, state, in_flight, exit_code,
                        interval, report, stopped_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb,
                           CASE WHEN %s THEN now() END)
                   ON CONFLICT (id) DO UPDATE SET
                       state = excluded.state, in_flight = excluded.in_flight,
                       exit_code = excluded.exit_code, report = excluded.report,
                       heartbeat_at = now(), stopped_at = excluded.stopped_at
                   -- A report overtaken by the last one (sent as the program ended)
                   -- changes nothing: a stopped process stays stopped.
                   WHERE nd_fleet_processes.stopped_at IS NULL""",
                (
                    self.id,
                    self._supervisor.name,
                    self.host,
                    self.pid,
                    self.version,
                    self.generation,
                    state,
                    in_flight,
                    exit_code,
                    self.interval,
                    report,
                    final,
                ),
            )
            if final:
                # Commands this process never took will never be carried out: say so,
                # rather than leave the one who asked without an answer. (Those it took
                # are answered by their own task, shielded, as the program ends.)
                connection.execute(
                    "UPDATE nd_fleet_commands SET taken_at = now(), result = %s"
                    " WHERE process_id = %s AND taken_at IS NULL",
                    (NOT_CARRIED_OUT, self.id),
                )
            # Whoever reports also forgets the processes that ended long ago.
            connection.execute(
                "DELETE FROM nd_fleet_processes WHERE coalesce(stopped_at, heartbeat_at)"
                " < now() - make_interval(secs => %s)",
                (KEEP_ENDED,),
            )
            connection.execute(
                "DELETE FROM nd_fleet_commands WHERE asked_at < now() - make_interval(secs => %s)",
                (KEEP_ENDED,),
            )
        self._registered = True

    def _take_commands_sync(self, connection: psycopg.Connection[Any]) -> list[FleetCommand]:
        rows = connection.execute(
            """UPDATE nd_fleet_commands SET taken_at = now()
               WHERE process_id = %s AND taken_at IS NULL
               RETURNING id, action, service, actor, asked_from""",
            (self.id,),
        ).fetchall()
        return [FleetCommand(*row) for row in sorted(rows)]

    def _answer_sync(self, connection: psycopg.Connection[Any], command: int, result: str) -> None:
        connection.execute(
            "UPDATE nd_fleet_commands SET result = %s WHERE id = %s", (result, command)
        )

    def _view_sync(self, connection: psycopg.Connection[Any]) -> tuple[list[Any], float]:
        rows = connection.execute(
            """SELECT id, app, host, pid, version, generation, state, in_flight, exit_code,
                      interval, extract(epoch FROM started_at)::float8,
                      extract(epoch FROM now() - heartbeat_at)::float8,
                      stopped_at IS NOT NULL, report
               FROM nd_fleet_processes ORDER BY app, host, pid, started_at"""
        ).fetchall()
        return rows, time.time()

    def _ask_sync(
        self,
        connection: psycopg.Connection[Any],
        process_id: str,
        action: str,
        service: str | None,
        actor: str,
        asked_from: str,
    ) -> int:
        with connection.transaction():
            row = connection.execute(
                """SELECT stopped_at IS NOT NULL,
                          now() - heartbeat_at > make_interval(secs => interval * %s), host, pid
                   FROM nd_fleet_processes WHERE id = %s""",
                (GONE_AFTER, process_id),
            ).fetchone()
            if row is None:
                raise UnknownProcessError(process_id)
            stopped, gone, host, pid = row
            if stopped or gone:
                raise InvalidTransitionError(
                    f"process {host}:{pid} ({process_id}) has "
                    f"{'stopped' if stopped else 'gone away'}: it cannot {action}"
                )
            (command,) = connection.execute(
                """INSERT INTO nd_fleet_commands (process_id, action, service, actor, asked_from)
                   VALUES (%s, %s, %s, %s, %s) RETURNING id""",
                (process_id, action, service, actor, asked_from),
            ).fetchone() or (0,)
            connection.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, process_id))
        return int(command)

    def _result_sync(self, connection: psycopg.Connection[Any], command: int) -> str | None:
        row = connection.execute(
            "SELECT result FROM nd_fleet_commands WHERE id = %s", (command,)
        ).fetchone()
        return None if row is None else row[0]

    async def aclose(self) -> None:
        """Close the connection (the dashboard's reads use it too)."""
        await self._database.aclose()


async def _notified(listener: psycopg.Connection[Any]) -> bool:
    """Wait for a notification on *listener*; False if its connection broke."""
    try:
        await trio.lowlevel.wait_readable(listener.fileno())
        listener.pgconn.consume_input()
        while listener.pgconn.notifies() is not None:
            pass
    except (OSError, ValueError, trio.ClosedResourceError):
        return False
    except Exception as exc:  # psycopg's errors: the connection is gone
        logger.debug("fleet: the listening connection broke: %s", exc)
        return False
    return not listener.closed


def _process_view(row: Any, now: float) -> dict[str, Any]:
    (
        process_id,
        app,
        host,
        pid,
        version,
        generation,
        state,
        in_flight,
        exit_code,
        interval,
        started_at,
        silent,
        stopped,
        report,
    ) = row
    gone = not stopped and silent > interval * GONE_AFTER
    report = report if isinstance(report, dict) else {}
    deadline = report.get("grace_deadline")
    services = []
    for service in report.get("services", []):
        jobs = [
            {
                "key": job.get("key"),
                "age": job.get("age", 0.0) + silent,
                "time_left": None if job.get("deadline") is None else job["deadline"] - now,
            }
            for job in service.get("jobs", [])
        ]
        services.append({**service, "jobs": jobs})
    return {
        "id": process_id,
        "name": f"{host}:{pid}",
        "app": app,
        "host": host,
        "pid": pid,
        "version": version,
        "generation": generation,
        # A process that stopped reporting is "gone"; its jobs are orphans until the
        # queue's sweeper hands them out again.
        "state": "gone" if gone else ("stopped" if stopped else state),
        "in_flight": in_flight,
        "orphans": in_flight if gone else 0,
        "exit_code": exit_code,
        "started_at": started_at,
        "heartbeat_age": silent,
        "time_left": None if deadline is None or gone or stopped else deadline - now,
        "services": services,
        "queues": [q for q in report.get("queues", []) if isinstance(q, dict) and "name" in q],
    }


def fleet_sources(supervisor: Supervisor) -> list[Any]:
    """The PostgreSQL queues the supervisor's worker pools use (each once)."""
    found: list[Any] = []
    for name in supervisor.service_names:
        for source in supervisor._services.record(name).spec.sources:
            if hasattr(source, "dsn") and source not in found:
                found.append(source)
    return found


def fleet_database(supervisor: Supervisor, fleet: str | bool | None) -> str | None:
    """The fleet database to register in: *fleet* when a string; none when False; when
    None, ``$NURSERY_DOWN_FLEET`` or else the database of the first PostgreSQL queue
    the worker pools use."""
    if fleet is False:
        return None
    if isinstance(fleet, str):
        return fleet
    if fleet not in (None, True):
        raise ConfigurationError(
            f"fleet must be a PostgreSQL connection string, False or None, got {fleet!r}"
        )
    from_environ = os.environ.get(FLEET_ENV, "").strip()
    if from_environ:
        return from_environ
    sources = fleet_sources(supervisor)
    if sources:
        return str(sources[0].dsn)
    if fleet is True:
        raise ConfigurationError(
            f"fleet=True, but no fleet database is known: pass fleet=DSN, set {FLEET_ENV}, "
            "or give a worker pool a PostgresQueue"
        )
    return None


def current_generation() -> int:
    """How many upgrades led to this process, counting itself (1 when started by hand)."""
    text = os.environ.get(GENERATION_ENV, "1")
    return int(text) if text.isdigit() and 0 < len(text) < 9 else 1
