"""The ``nursery-down`` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._exceptions import ConfigurationError
from ._reports import format_drain_report
from ._supervisor import EXIT_USAGE, Supervisor
from ._upgrade import ANSWER_MARGIN
from ._upgrade import DEFAULT_TIMEOUT as DEFAULT_UPGRADE_TIMEOUT


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one clear line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EXIT_CODES = """\
exit codes:
  0  drained, every job finished
  3  drained, but some jobs were hard-cancelled (grace exceeded or escalated)
  1  a service FAILED (restarted too often) or the program crashed
  2  usage or configuration error
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nursery-down",
        description="Run trio services that shut down without losing work.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="run a Supervisor until SIGTERM/SIGINT drains it",
        description="Run a Supervisor the way nd.run() does, owning SIGTERM, SIGINT and SIGHUP.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "target",
        metavar="TARGET",
        help="MODULE:ATTR or path/to/file.py:ATTR naming a Supervisor (ATTR may be "
        "omitted when the file has exactly one)",
    )
    run.add_argument("--grace", type=_seconds, metavar="S", help="grace period in seconds")
    run.add_argument(
        "--outer-deadline",
        type=_positive_seconds,
        metavar="S",
        help="seconds the service manager waits after SIGTERM before it kills "
        "(TimeoutStopSec, terminationGracePeriodSeconds); warns at start when the drain "
        "does not fit (default: $NURSERY_DOWN_OUTER_DEADLINE)",
    )
    run.add_argument(
        "--pre-drain",
        type=_seconds,
        metavar="S",
        help="on SIGTERM, report draining (/readyz 503) but keep serving this long before "
        "the drain begins (default: $NURSERY_DOWN_PRE_DRAIN, else the supervisor's)",
    )
    run.add_argument(
        "--on-hup",
        choices=("restart", "upgrade"),
        default="restart",
        help="what SIGHUP does: restart every service in this process (default), or "
        "upgrade the program like SIGUSR2",
    )
    run.add_argument(
        "--upgrade-cwd",
        metavar="DIR",
        help="working directory of the new generation at an upgrade (default: the one "
        "at start), e.g. a 'current' symlink of your releases",
    )
    run.add_argument(
        "--upgrade-timeout",
        type=_positive_seconds,
        metavar="S",
        default=DEFAULT_UPGRADE_TIMEOUT,
        help="seconds the new generation has to be ready at an upgrade (default %(default)g)",
    )
    run.add_argument(
        "--pid-file",
        metavar="PATH",
        help="write the pid here; an upgrade replaces it atomically with the new one's",
    )
    fleet = run.add_mutually_exclusive_group()
    fleet.add_argument(
        "--fleet",
        metavar="DSN",
        help="PostgreSQL database of the fleet to join (default: $NURSERY_DOWN_FLEET, else "
        "the database of a PostgresQueue the worker pools use)",
    )
    fleet.add_argument(
        "--no-fleet", dest="fleet", action="store_const", const=False, help="join no fleet"
    )
    dashboard = run.add_mutually_exclusive_group()
    dashboard.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        default=os.environ.get("NURSERY_DOWN_DASHBOARD") or None,
        help="serve the dashboard and HTTP API here (default: $NURSERY_DOWN_DASHBOARD, else off)",
    )
    dashboard.add_argument(
        "--no-dashboard", dest="dashboard", action="store_const", const=None, help="no dashboard"
    )

    def add_connection(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--url",
            help="base URL of the program's dashboard (default: $NURSERY_DOWN_URL, "
            "else http://127.0.0.1:8080)",
        )
        command.add_argument(
            "--token", help="operator token (default: $NURSERY_DOWN_TOKEN, or ?token= in --url)"
        )
        command.add_argument("--json", action="store_true", help="print the snapshot as JSON")

    status = commands.add_parser("status", help="show every service's state and in-flight jobs")
    status.add_argument("service", nargs="?", metavar="SERVICE", help="only this service")
    add_connection(status)
    for action, text in ACTIONS.items():
        command = commands.add_parser(action, help=text)
        if action == "start":
            command.add_argument("service", metavar="SERVICE", help="the service to start")
        else:
            command.add_argument(
                "service", nargs="?", metavar="SERVICE", help="one service (default: the whole app)"
            )
        if action == "drain":
            command.add_argument("--grace", type=_seconds, metavar="S", help="grace in seconds")
        add_connection(command)
    upgrade = commands.add_parser(
        "upgrade",
        help="start the next generation of the program; once it is ready, this one drains",
    )
    add_connection(upgrade)
    extend = commands.add_parser("extend-grace", help="move a drain's grace deadline later")
    extend.add_argument("seconds", type=_seconds, metavar="SECONDS")
    extend.add_argument("service", nargs="?", metavar="SERVICE", help="default: the whole app")
    add_connection(extend)
    dead = commands.add_parser(
        "dead",
        help="list, requeue or discard the dead letters of a service's job source",
        description="Dead letters: jobs that failed every attempt. 'list' shows them (every "
        "service's sources without SERVICE); 'requeue' puts them back in the queue; "
        "'discard' deletes them for good. Name the job ids, or pass --all.",
    )
    dead.add_argument(
        "action",
        choices=("list", "requeue", "discard"),
        metavar="ACTION",
        help="list, requeue or discard",
    )
    dead.add_argument("service", nargs="?", metavar="SERVICE", help="the service")
    dead.add_argument("ids", nargs="*", type=_job_id, metavar="ID", help="dead letter ids")
    dead.add_argument(
        "--source",
        type=int,
        default=0,
        metavar="N",
        help="which of the service's job sources (default 0: its worker pool's)",
    )
    dead.add_argument("--all", action="store_true", help="requeue or discard every one")
    add_connection(dead)
    tasks = commands.add_parser(
        "tasks",
        help="print every trio task of the program and where each one waits",
        description="Print the program's trio task tree (GET /debug/tasks): each task "
        "with its chain of awaits, the function, file and line of each frame.",
    )
    add_connection(tasks)
    fleet_command = commands.add_parser(
        "fleet",
        help="list the processes of the fleet, or act on one of them",
        description="With no ACTION: list every process of the fleet this program is in "
        "(through its dashboard) and the figures of its queues. With an ACTION: ask one "
        "process to carry it out; the request travels through the fleet's database.",
    )
    fleet_command.add_argument(
        "action",
        nargs="?",
        choices=FLEET_ACTIONS,
        metavar="ACTION",
        help=f"one of {', '.join(FLEET_ACTIONS)}",
    )
    fleet_command.add_argument(
        "process", nargs="?", metavar="PROCESS", help="its id, HOST:PID or PID, as listed"
    )
    fleet_command.add_argument(
        "service", nargs="?", metavar="SERVICE", help="one service (default: the whole process)"
    )
    add_connection(fleet_command)
    from .testing._chaos import add_chaos_command

    add_chaos_command(commands)
    return parser


ACTIONS = {
    "drain": "drain one service, or the whole app: intake stops, in-flight jobs finish",
    "start": "start a stopped or failed service",
    "restart": (
        "drain a service and start it again (the whole app: stop every service in stop "
        "order, then start them in start order)"
    ),
    "escalate": "hard-cancel in-flight jobs now",
}


FLEET_ACTIONS = ("drain", "start", "restart", "escalate", "upgrade")


def _job_id(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) < 19):
        raise argparse.ArgumentTypeError(f"a job id is a whole number, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = _seconds(text)
    except argparse.ArgumentTypeError:
        value = 0.0  # whatever was wrong, the message names the bound that applies here
    if value > 0:
        return value
    raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")


def load_supervisor(target: str) -> Supervisor:
    """Import TARGET (``module:attr`` or ``file.py:attr``) and return the Supervisor it names."""
    location, _, attribute = (
        target.partition(":")
        if not _looks_like_windows_path(target)
        else (
            target,
            "",
            "",
        )
    )
    if not location:
        raise ConfigurationError(f"no module or file in target {target!r}; use MODULE:ATTR")
    if location.endswith(".py") or os.sep in location:
        path = Path(location)
        if not path.is_file():
            raise ConfigurationError(f"no such file: {location}")
        module_name = f"_nursery_down_target_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"cannot load {location} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # as `python file.py` would
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot import {location}: {type(exc).__name__}: {exc}"
            ) from None
    else:
        sys.path.insert(0, os.getcwd())  # as `python -m` would
        try:
            module = importlib.import_module(location)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot import module {location!r}: {type(exc).__name__}: {exc}"
            ) from None
    if not attribute:
        found = [name for name, value in vars(module).items() if isinstance(value, Supervisor)]
        if len(found) != 1:
            what = "no Supervisor" if not found else f"several Supervisors ({', '.join(found)})"
            raise ConfigurationError(f"{location} defines {what}; name one as {location}:ATTR")
        attribute = found[0]
    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigurationError(f"{location} has no attribute {attribute!r}") from None
    if not isinstance(value, Supervisor):
        raise ConfigurationError(
            f"{target} is a {type(value).__name__}, not a nursery_down.Supervisor"
        )
    return value


def _looks_like_windows_path(target: str) -> bool:
    return len(target) > 1 and target[1] == ":" and target[0].isalpha() and os.name == "nt"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nursery-down`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "chaos":
        from .testing._chaos import run_chaos

        return run_chaos(args)
    return _operate(args)


def _run(args: argparse.Namespace) -> int:
    from ._run import run

    try:
        supervisor = load_supervisor(args.target)
        supervisor.check()
    except ConfigurationError as exc:
        print(f"nursery-down: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    code = run(
        supervisor,
        dashboard=args.dashboard,
        grace=args.grace,
        outer_deadline=args.outer_deadline,
        pre_drain=args.pre_drain,
        on_hup=args.on_hup,
        upgrade_cwd=args.upgrade_cwd,
        upgrade_timeout=args.upgrade_timeout,
        pid_file=args.pid_file,
        fleet=args.fleet,
    )
    report = supervisor.last_app_drain_report()
    if report is not None:
        sys.stderr.write(format_drain_report(report))
    return code


def _operate(args: argparse.Namespace) -> int:
    """status and the actions: talk to a running program's HTTP API."""
    from ._client import ApiClient, ClientError, require_service_name

    try:
        client = ApiClient(args.url, args.token)
        if getattr(args, "service", None) is not None:
            require_service_name(args.service)
        if args.command == "fleet":
            text = _fleet(client, args)
            print(text)  # noqa: T201
            return 0
        if args.command == "dead":
            print(_dead(client, args))  # noqa: T201
            return 0
        if args.command == "tasks":
            sys.stdout.write(client.tasks())
            return 0
        if args.command == "status":
            snapshot = client.snapshot()
            if args.service is not None and args.service not in {
                s["name"] for s in snapshot["services"]
            }:
                known = ", ".join(s["name"] for s in snapshot["services"])
                raise ClientError(f"unknown service {args.service!r}; known services: {known}")
        elif args.command == "upgrade":
            # The answer comes once the new generation is ready or failed: within the
            # program's upgrade timeout and pre-drain delay, and the time to stop and
            # reap a generation that gave up.
            shown = client.snapshot()
            limit, delay = shown.get("upgrade_timeout"), shown.get("pre_drain")
            if not (isinstance(limit, int | float) and math.isfinite(limit)):
                limit = DEFAULT_UPGRADE_TIMEOUT  # a program that does not say
            if not (isinstance(delay, int | float) and math.isfinite(delay)):
                delay = 0.0
            # (A day at most: a socket timeout has its limits, and nobody waits longer.)
            client.timeout = min(max(client.timeout, limit + delay + ANSWER_MARGIN), 86400.0)
            snapshot = client.action("upgrade")
            print(  # noqa: T201
                f"upgraded: the new generation (pid {snapshot.get('upgraded_to')}) is ready; "
                f"this one (pid {snapshot.get('pid')}) drains",
                file=sys.stderr,
            )
        elif args.command == "extend-grace":
            body = {"seconds": args.seconds, "service": args.service}
            snapshot = client.action("extend-grace", None, body)
        else:
            body = {"grace": args.grace} if getattr(args, "grace", None) is not None else {}
            snapshot = client.action(args.command, args.service, body)
        if args.json:
            text = json.dumps(snapshot, indent=2)
        else:
            try:
                text = format_status(snapshot, only=getattr(args, "service", None))
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                raise ClientError(
                    f"{client.url} answered a snapshot this command cannot read; "
                    "is --url the dashboard's address?"
                ) from None
    except ClientError as exc:
        print(f"nursery-down: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    print(text)  # noqa: T201
    return 0


def _fleet(client: Any, args: argparse.Namespace) -> str:
    """``nursery-down fleet [ACTION PROCESS [SERVICE]]``: the list, or one action."""
    from ._client import ClientError

    if args.action is not None and args.process is None:
        raise ClientError(f"fleet {args.action} needs a PROCESS (its id, HOST:PID or PID)")
    if args.action is None and args.process is not None:
        raise ClientError("name an ACTION before the PROCESS: fleet drain PROCESS [SERVICE]")
    if args.action == "start" and args.service is None:
        raise ClientError("fleet start needs a SERVICE: fleet start PROCESS SERVICE")
    fleet = client.fleet()
    if args.action is None:
        return json.dumps(fleet, indent=2) if args.json else format_fleet(fleet)
    process = _find_process(fleet["processes"], args.process)
    if args.action == "upgrade":
        client.timeout = max(client.timeout, 90.0)  # answers once the new one is ready
    answer = client.fleet_action(process["id"], args.action, args.service)
    if args.json:
        return json.dumps(answer, indent=2)
    target = f"service {args.service} of" if args.service else "process"
    return f"{args.action} {target} {process['name']} ({process['id']}): {answer['result']}"


def _dead(client: Any, args: argparse.Namespace) -> str:
    """``nursery-down dead list|requeue|discard [SERVICE] [ID...] [--all]``."""
    from ._client import ClientError, one_line

    if args.action == "list":
        if args.ids or args.all:
            raise ClientError("dead list takes no ids and no --all")
        if args.service is not None:
            targets = [(args.service, args.source)]
        else:
            snapshot = client.snapshot()
            targets = [
                (service["name"], source["index"])
                for service in snapshot["services"]
                for source in service.get("sources", [])
                if "list" in source.get("dead_letters", [])
            ]
        listings = [(name, index, client.dead_letters(name, index)) for name, index in targets]
        if args.json:
            return json.dumps(
                [{"service": n, "source": i, **answer} for n, i, answer in listings], indent=2
            )
        rows: list[tuple[str, ...]] = [("SERVICE", "SOURCE", "ID", "ATTEMPTS", "ERROR", "PAYLOAD")]
        lines: list[str] = []
        for name, index, answer in listings:
            for job in answer["dead"]:
                rows.append(
                    (
                        name,
                        str(index),
                        str(job["id"]),
                        str(job.get("attempts", "")),
                        one_line(str(job.get("error", "")))[:60],
                        one_line(str(job.get("preview", "")))[:60],
                    )
                )
            if answer["total"] > len(answer["dead"]):
                lines.append(f"({name}: {answer['total']} in all, the oldest listed)")
        if len(rows) == 1:
            return "no dead letters"
        return "\n".join([*_table(rows), *lines])
    if args.service is None:
        raise ClientError(f"dead {args.action} needs a SERVICE, then ids or --all")
    if bool(args.ids) == args.all:
        raise ClientError(f"dead {args.action}: name the ids, or pass --all (not both)")
    answer = client.settle_dead(args.service, args.source, args.action, args.ids or None)
    if args.json:
        return json.dumps(answer, indent=2)
    done = "requeued" if args.action == "requeue" else "discarded"
    return f"{done} {answer[done]} dead letters of {args.service} (source {args.source})"


def _find_process(processes: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    """The one process whose id, ``host:pid`` or pid is *wanted*."""
    from ._client import ClientError

    found = [
        process
        for process in processes
        if wanted in (process["id"], process["name"], str(process.get("pid")))
    ]
    live = [process for process in found if process["state"] not in ("stopped", "gone")]
    if len(live) == 1 or (len(found) == 1 and not live):
        return (live or found)[0]
    if not found:
        raise ClientError(
            f"no process {wanted!r} in the fleet; list them with 'nursery-down fleet'"
        )
    names = ", ".join(f"{p['id']} ({p['name']})" for p in found)
    raise ClientError(f"{wanted!r} names several processes ({names}); give the id")


def format_fleet(fleet: dict[str, Any]) -> str:
    """A readable table of the fleet: one row per process, then one per queue."""
    rows: list[tuple[str, ...]] = [
        (
            "PROCESS",
            "HOST:PID",
            "APP",
            "VERSION",
            "GEN",
            "STATE",
            "IN-FLIGHT",
            "ORPHANS",
            "LAST REPORT",
        )
    ]
    for process in fleet["processes"]:
        mark = "*" if process["id"] == fleet.get("this") else ""
        rows.append(
            (
                process["id"] + mark,
                process["name"],
                str(process.get("app", "")),
                str(process.get("version") or "-"),
                str(process.get("generation", "")),
                process["state"].upper(),
                str(process.get("in_flight", "")),
                str(process.get("orphans", "")),
                f"{float(process.get('heartbeat_age', 0.0)):.1f}s ago",
            )
        )
    lines = _table(rows)
    if not fleet["processes"]:
        lines.append("(no process has reported yet)")
    if fleet["queues"]:
        queue_rows: list[tuple[str, ...]] = [
            ("QUEUE", "QUEUED", "LEASED", "DONE", "DEAD", "REPORTED BY")
        ]
        for queue in fleet["queues"]:
            queue_rows.append(
                (
                    str(queue["name"]),
                    *(str(queue.get(key, "-")) for key in ("queued", "leased", "done", "dead")),
                    str(queue.get("reported_by", "")),
                )
            )
        lines += ["", *_table(queue_rows)]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def format_status(snapshot: dict[str, Any], *, only: str | None = None) -> str:
    """A readable table of a snapshot, one row per service."""
    header = (
        "SERVICE",
        "STATE",
        "IN-FLIGHT",
        "OLDEST",
        "DONE",
        "FAILED",
        "CUT",
        "RESTARTS",
        "HEALTH",
    )
    rows = [header]
    for service in snapshot["services"]:
        if only is not None and service["name"] != only:
            continue
        oldest = service.get("oldest_job_age")
        rows.append(
            (
                service["name"],
                service["state"].upper(),
                str(service["in_flight"]),
                "-" if oldest is None else f"{oldest:.1f}s",
                str(service["completed"]),
                str(service["failed"]),
                str(service["hard_cancelled"]),
                str(service["restarts"]),
                str(service["health"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"{snapshot['app']} (pid {snapshot['pid']}): {snapshot['state']}"]
    lines_after: list[str] = []
    for service in snapshot["services"]:
        if only is not None and service["name"] != only:
            continue
        for source in service.get("sources", []):
            figures = ", ".join(
                f"{key} {source.get(key)}" for key in ("queued", "leased", "done", "dead")
            )
            lines_after.append(f"  {service['name']} source {source.get('name')}: {figures}")
    previous = snapshot.get("previous_generation")
    if previous:
        # After an upgrade: the generation this one replaced, while it drains and after.
        about = [previous["state"]]
        if previous["state"] in ("running", "draining"):
            about.append(f"{previous['in_flight']} in flight")
            if previous["time_left"] is not None:
                about.append(f"hard-cancel in {max(0.0, previous['time_left']):.1f}s")
        if previous["exit_code"] is not None:
            about.append(f"exit code {previous['exit_code']}")
        lines.append(f"previous generation (pid {previous['pid']}): {', '.join(about)}")
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if lines_after:
        lines += ["job sources:", *lines_after]
    return "\n".join(lines)
