"""The ``nursery-down`` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ._exceptions import ConfigurationError
from ._supervisor import EXIT_USAGE, Supervisor


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
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


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
    parser.error(f"unknown command {args.command!r}")


def _run(args: argparse.Namespace) -> int:
    from ._run import run

    try:
        supervisor = load_supervisor(args.target)
        supervisor.check()
    except ConfigurationError as exc:
        print(f"nursery-down: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    return run(supervisor, dashboard=args.dashboard, grace=args.grace)
