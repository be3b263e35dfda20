"""``nursery-down chaos TARGET``: run a target again and again, signal it, check its history."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._harness import ChaosHarness, Target, TargetError, process_running
from ._history import CheckReport, job_order

#: What ``--signal`` accepts: a signal, or TERM then another TERM during the drain.
PLANS = ("TERM", "INT", "HUP", "KILL", "TERM+TERM", "USR2")
#: Exit codes ``nursery-down run`` may end with after a drain that was escalated.
ESCALATED_EXITS = (0, 3)

DESCRIPTION = """\
Run TARGET again and again; in each run, send a signal at a random instant once it
is ready, wait for it to exit, and check from the history of its jobs that nothing
was lost and that only jobs in flight at a kill ran twice.

TARGET is MODULE:ATTR or path/to/file.py[:ATTR], run as `nursery-down run TARGET
--no-dashboard` (ready once it logs that every service started), or, after `--`, any
command line (give --ready-line, else it counts as ready at once).

Each run gets a fresh folder. The target finds there, through its environment, the
SQLite queue file to use ($QUEUE_PATH, or the variable --queue-env names) and the
history file for a RecordingSource ($NURSERY_DOWN_HISTORY). After a KILL the target
is started once more, until the jobs the kill interrupted are done, then stopped
with TERM. HUP is followed by TERM after another random delay. USR2 upgrades the
target: its next generation takes over, the old one must drain and exit 0, and the
new one is stopped with TERM after another random delay (and must exit cleanly too).

Run i uses seed SEED+i, so `--seed SEED+i --runs 1` replays it (the signal and its
instant; the target's own timing still varies).
"""

EPILOG = """\
exit codes:
  0  nothing lost, no unexplained duplicate, every graceful stop exited 0 in time
  1  a run failed (the summary names it and its seed)
  2  usage error

example:
  QUEUE_RATE=20 nursery-down chaos examples/queue_worker.py:sup --runs 20 \\
      --signal TERM --signal KILL --after 0.3..1.0 \\
      --env QUEUE_JOB_SECONDS=0.1 --env QUEUE_WORKERS=4 --env QUEUE_DASHBOARD=off
"""


def add_chaos_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``chaos`` command to the ``nursery-down`` parser's *subparsers*."""
    chaos = subparsers.add_parser(
        "chaos",
        help="signal a program mid-job again and again; report lost and duplicated jobs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chaos.add_argument(
        "target",
        nargs="+",
        metavar="TARGET",
        help="MODULE:ATTR, path/to/file.py[:ATTR], or -- COMMAND [ARG ...]",
    )
    chaos.add_argument("--runs", type=_count, default=10, metavar="N", help="runs (default 10)")
    chaos.add_argument(
        "--signal",
        dest="signals",
        action="append",
        type=_plan,
        metavar="SIGNAL",
        help="TERM, INT, HUP, KILL, TERM+TERM or USR2 (upgrade); repeat to mix them at "
        "random (default TERM)",
    )
    chaos.add_argument(
        "--after",
        type=_span,
        default=(0.5, 2.0),
        metavar="MIN..MAX",
        help="seconds from ready to the signal, drawn at random (default 0.5..2)",
    )
    chaos.add_argument(
        "--seed", type=int, metavar="S", help="seed of the first run (default: random)"
    )
    chaos.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    chaos.add_argument(
        "--env",
        action="append",
        default=[],
        type=_assignment,
        metavar="K=V",
        help="set an environment variable for the target (repeatable)",
    )
    chaos.add_argument(
        "--queue-env",
        default="QUEUE_PATH",
        metavar="NAME",
        help="the variable the target reads its SQLite queue path from (default QUEUE_PATH)",
    )
    chaos.add_argument(
        "--ready-line",
        metavar="TEXT",
        help="ready once TEXT appears in the target's output (default for nursery-down run "
        "targets: the line saying every service started)",
    )
    chaos.add_argument(
        "--exit-within",
        type=_positive_seconds,
        default=30.0,
        metavar="S",
        help="a graceful stop must exit within S seconds of its signal (default 30)",
    )
    chaos.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60.0,
        metavar="S",
        help="bound on every other wait: readiness, recovery after a kill (default 60)",
    )
    chaos.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep each run's folder (queue, history, output) under DIR "
        "(default: a temporary folder, removed at the end)",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _plan(text: str) -> str:
    parts = [part.strip().upper().removeprefix("SIG") for part in text.split("+")]
    plan = "+".join(parts)
    if plan not in PLANS:
        raise argparse.ArgumentTypeError(f"unknown signal {text!r}; use one of {', '.join(PLANS)}")
    return plan


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _span(text: str) -> tuple[float, float]:
    low_text, dots, high_text = text.partition("..")
    low = _number(low_text)
    high = _number(high_text) if dots else low
    if high < low:
        raise argparse.ArgumentTypeError(f"MIN is above MAX in {text!r}; write it as MIN..MAX")
    return low, high


def _assignment(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


# -- one run ------------------------------------------------------------------------------


@dataclass
class _Options:
    target: str | list[str]
    ready_line: str | None
    env: dict[str, str]
    queue_env: str
    after: tuple[float, float]
    exit_within: float
    timeout: float


@dataclass
class RunResult:
    """What one run did and what the checker found."""

    index: int
    seed: int
    plan: str
    after: float
    directory: Path
    exit_codes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    report: CheckReport | None = None
    usage_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self, keep_directory: bool) -> dict[str, Any]:
        report = self.report
        data: dict[str, Any] = {
            "run": self.index,
            "seed": self.seed,
            "signal": self.plan,
            "after": round(self.after, 4),
            "exit_codes": self.exit_codes,
            "ok": self.ok,
            "problems": self.problems,
            "directory": str(self.directory) if keep_directory else None,
        }
        if report is not None:
            data.update(
                enqueued=len(report.enqueued),
                acked=len(report.acked),
                dead=len(report.dead),
                pending=len(report.pending),
                lost=list(report.lost),
                duplicated=[
                    {
                        "job": d.job,
                        "completed": d.completed,
                        "interrupted": d.interrupted,
                        "in_flight_at_kill": d.in_flight_at_kill,
                    }
                    for d in report.duplicated
                ],
                unexpected=list(report.unexpected),
                started_after_signal=[
                    {"job": s.job, "pid": s.pid, "signal": s.signal, "delay": round(s.delay, 4)}
                    for s in report.started_after_signal
                ],
                in_flight_at_kill=sorted(
                    (job for jobs in report.in_flight_at_kill.values() for job in jobs),
                    key=job_order,
                ),
                exit_seconds=[
                    {
                        "pid": t.pid,
                        "signal": t.signal,
                        "exit_code": t.returncode,
                        "seconds": round(t.seconds, 4),
                    }
                    for t in report.exit_times
                ],
                max_exit_seconds=_rounded(report.max_exit_seconds),
            )
        return data


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def run_one(
    index: int, seed: int, plans: Sequence[str], options: _Options, directory: Path
) -> RunResult:
    """Run the target once with *seed*: start, signal, stop, check."""
    rng = random.Random(seed)
    plan = rng.choice(list(plans))
    after = rng.uniform(*options.after)
    later = rng.uniform(*options.after)
    result = RunResult(index, seed, plan, after, directory)
    harness = ChaosHarness(
        directory,
        env=options.env,
        queue_env=options.queue_env or None,
        seed=seed,
        patience=options.timeout,
    )
    try:
        _drive(harness, plan, after, later, options, result)
    except TargetError as exc:
        result.problems.append(str(exc).splitlines()[0])
    finally:
        try:
            harness.close()
        except TargetError as exc:  # a process that even SIGKILL did not end in time
            result.problems.append(str(exc).splitlines()[0])
    if result.usage_error is not None:
        return result
    result.exit_codes = [t.returncode for t in harness.targets if t.returncode is not None]
    history = harness.history()
    if not history.events and not harness.queue_path.exists():
        result.problems.append(
            f"no job history: the target wrote no SQLite queue at ${options.queue_env} "
            "and recorded nothing at $NURSERY_DOWN_HISTORY"
        )
        return result
    report = harness.check()
    result.report = report
    if report.lost:
        result.problems.append(f"lost {len(report.lost)} jobs: {_ids(report.lost)}")
    if report.unexpected:
        result.problems.append(
            f"{len(report.unexpected)} jobs never enqueued: {_ids(report.unexpected)}"
        )
    if report.unexplained_duplicates:
        jobs = [d.job for d in report.unexplained_duplicates]
        result.problems.append(
            f"{len(jobs)} jobs ran twice without being in flight at a kill: {_ids(jobs)}"
        )
    return result


def _drive(
    harness: ChaosHarness,
    plan: str,
    after: float,
    later: float,
    options: _Options,
    result: RunResult,
) -> None:
    target = _start(harness, options, result)
    if target is None:
        return
    if plan == "TERM+TERM":
        # The second TERM must land during the drain while jobs still run, or there is
        # nothing to escalate: so the first goes when a job is in flight, and the second
        # as soon as the drain shows, if a job still runs then.
        target.sleep(after, "before SIGTERM")
        target.wait_in_flight(1, options.timeout)
        target.send("TERM")
        try:
            target.wait_draining(options.exit_within)
            if target.in_flight():
                target.send("TERM")
        except TargetError:
            pass  # it finished draining first: judged by its exit below
        _expect_exit(target, ESCALATED_EXITS, options, result)
        return
    target.send_after(plan, after)
    if plan in ("TERM", "INT"):
        _expect_exit(target, (0,), options, result)
    elif plan == "HUP":
        target.send_after("TERM", later)
        _expect_exit(target, (0,), options, result)
    elif plan == "USR2":
        _follow_upgrade(harness, target, later, options, result)
    else:  # KILL, then start again: the jobs the kill interrupted must get done
        code = target.wait_exit(options.timeout)
        if code != -9:
            result.problems.append(f"exited {code} instead of dying by SIGKILL")
        orphans = set(harness.history().in_flight(target.pid))
        follow = _start(harness, options, result)
        if follow is None:
            return
        follow.wait_done(orphans, options.timeout)
        follow.send("TERM")
        _expect_exit(follow, (0,), options, result)


#: What the old generation logs once the new one is ready.
_HANDED_OVER = re.compile(r"upgrade: the new generation \(pid (\d+)\) is ready")


def _follow_upgrade(
    harness: ChaosHarness, target: Target, later: float, options: _Options, result: RunResult
) -> None:
    """USR2: the old generation exits 0 once the new one is ready; then TERM the new one."""
    try:
        code = target.wait_exit(options.exit_within + options.timeout)
    except TargetError:
        result.problems.append(f"pid {target.pid} still ran after USR2 (no upgrade took over)")
        return
    match = _HANDED_OVER.search(target.output())
    if match is None:
        result.problems.append(f"pid {target.pid} exited {code} after USR2 without an upgrade")
        return
    if code != 0:
        result.problems.append(f"pid {target.pid} exited {code} after its upgrade, not 0")
    successor = int(match.group(1))
    try:
        time.sleep(later)
        harness.recorder.record_signal(successor, "SIGTERM")
        os.kill(successor, signal.SIGTERM)
        deadline = time.monotonic() + options.exit_within
        while process_running(successor):
            if time.monotonic() > deadline:
                result.problems.append(
                    f"pid {successor} (the new generation) still ran "
                    f"{options.exit_within:g} s after SIGTERM"
                )
                return
            time.sleep(0.02)
    except ProcessLookupError:
        result.problems.append(f"the new generation (pid {successor}) died before SIGTERM")
    finally:
        if process_running(successor):
            os.kill(successor, signal.SIGKILL)
    stopped = target.output().count("stopped, exit code 0")
    if stopped < 2:
        result.problems.append(f"the new generation (pid {successor}) did not exit 0")


def _start(harness: ChaosHarness, options: _Options, result: RunResult) -> Target | None:
    try:
        return harness.start(options.target, ready_line=options.ready_line, timeout=options.timeout)
    except TargetError as exc:
        target = harness.targets[-1]
        if target.returncode == 2 and len(harness.targets) == 1:
            lines = target.output().strip().splitlines()
            result.usage_error = lines[-1] if lines else "exit code 2"
        result.problems.append(str(exc).splitlines()[0])
        return None


def _expect_exit(
    target: Target, codes: Sequence[int], options: _Options, result: RunResult
) -> None:
    """The exit must be one of *codes*, within --exit-within of the first stop signal."""
    stop = next(s for s in target.signals if s.signal in ("SIGTERM", "SIGINT"))
    try:
        code = target.wait_exit(max(0.0, stop.time + options.exit_within - time.time()))
    except TargetError:
        result.problems.append(
            f"pid {target.pid} still ran {options.exit_within:g} s after {stop.signal}"
        )
        return
    if code not in codes:
        wanted = " or ".join(str(c) for c in codes)
        result.problems.append(f"pid {target.pid} exited {code} after {stop.signal}, not {wanted}")


def _ids(jobs: Any, limit: int = 10) -> str:
    shown = sorted(jobs, key=job_order)
    text = ", ".join(str(job) for job in shown[:limit])
    return text + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


# -- the command --------------------------------------------------------------------------


def run_chaos(args: argparse.Namespace) -> int:
    """Run ``nursery-down chaos`` with parsed *args*; return the exit code."""
    tokens: list[str] = list(args.target)
    if len(tokens) == 1 and _is_supervisor_target(tokens[0]):
        target: str | list[str] = tokens[0]
    else:
        target = tokens
    plans = list(dict.fromkeys(args.signals or ["TERM"]))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    options = _Options(
        target=target,
        ready_line=args.ready_line,
        env=dict(args.env),
        queue_env=args.queue_env,
        after=args.after,
        exit_within=args.exit_within,
        timeout=args.timeout,
    )
    keep = args.workdir is not None
    root = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="nursery-down-chaos-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _usage(f"cannot create --workdir {args.workdir}: {exc.strerror}")
    progress = _Progress(sys.stderr, args.runs)
    results: list[RunResult] = []
    started = time.monotonic()
    try:
        for index in range(args.runs):
            result = run_one(index, seed + index, plans, options, root / f"run-{index:03d}")
            if result.usage_error is not None:
                return _usage(f"TARGET exited 2 before it was ready: {result.usage_error}")
            results.append(result)
            progress.update(result)
    finally:
        progress.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    summary = _summary(results, seed, elapsed)
    print(_table(results), file=sys.stdout)  # noqa: T201
    print(summary["verdict"], file=sys.stdout)  # noqa: T201
    if args.json:
        summary["details"] = [r.to_json(keep) for r in results]
        try:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            print(f"nursery-down chaos: cannot write {args.json}: {exc.strerror}", file=sys.stderr)  # noqa: T201
            return 1
    return 0 if summary["ok"] else 1


def _is_supervisor_target(token: str) -> bool:
    location = token.partition(":")[0]
    return bool(location) and (location.endswith(".py") or (":" in token and " " not in token))


def _usage(message: str) -> int:
    print(  # noqa: T201
        f"nursery-down chaos: error: {message} (see nursery-down chaos --help)", file=sys.stderr
    )
    return 2


def _summary(results: list[RunResult], seed: int, elapsed: float) -> dict[str, Any]:
    reports = [r.report for r in results if r.report is not None]
    lost = sum(len(r.lost) for r in reports)
    duplicated = sum(len(r.duplicated) for r in reports)
    unexplained = sum(len(r.unexplained_duplicates) for r in reports)
    unexpected = sum(len(r.unexpected) for r in reports)
    late = sum(len(r.started_after_signal) for r in reports)
    exits = [r.max_exit_seconds for r in reports if r.max_exit_seconds is not None]
    max_exit = max(exits, default=None)
    failed = [r for r in results if not r.ok]
    counts = (
        f"{len(results)} runs (seed {seed}) in {elapsed:.1f} s: {lost} lost, {duplicated} "
        f"duplicated ({duplicated - unexplained} in flight at a kill), {unexpected} unexpected, "
        f"{late} started after a drain signal, max exit "
        + ("-" if max_exit is None else f"{max_exit:.2f} s")
    )
    if failed:
        first = failed[0]
        lines = [f"FAILED: {counts}"]
        for result in failed:
            lines.append(
                f"  run {result.index} (seed {result.seed}, {result.plan} after "
                f"{result.after:.2f} s): {'; '.join(result.problems)}"
            )
        lines.append(f"  replay the first with: --seed {first.seed} --runs 1")
        verdict = "\n".join(lines)
    else:
        verdict = f"OK: {counts}"
    return {
        "ok": not failed,
        "runs": len(results),
        "seed": seed,
        "seconds": round(elapsed, 3),
        "lost": lost,
        "duplicated": duplicated,
        "duplicated_in_flight_at_kill": duplicated - unexplained,
        "unexpected": unexpected,
        "started_after_signal": late,
        "max_exit_seconds": _rounded(max_exit),
        "failed_runs": [{"run": r.index, "seed": r.seed, "problems": r.problems} for r in failed],
        "verdict": verdict,
    }


_COLUMNS = (
    "RUN",
    "SEED",
    "SIGNAL",
    "AFTER",
    "EXITS",
    "EXIT-S",
    "JOBS",
    "ACKED",
    "PENDING",
    "LOST",
    "DUP",
    "KILLED-DUP",
    "LATE",
    "RESULT",
)


def _table(results: list[RunResult]) -> str:
    rows = [_COLUMNS]
    for result in results:
        report = result.report
        cells: tuple[str, ...]
        if report is None:
            cells = ("-",) * 9
        else:
            longest = report.max_exit_seconds
            cells = (
                ",".join(str(code) for code in result.exit_codes) or "-",
                "-" if longest is None else f"{longest:.2f}",
                str(len(report.enqueued)),
                str(len(report.acked)),
                str(len(report.pending)),
                str(len(report.lost)),
                str(len(report.duplicated)),
                str(len(report.duplicated) - len(report.unexplained_duplicates)),
                str(len(report.started_after_signal)),
            )
        rows.append(
            (
                str(result.index),
                str(result.seed),
                result.plan,
                f"{result.after:.2f}",
                *cells,
                "ok" if result.ok else "FAILED",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


class _Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, a line per run
    otherwise (logs and CI)."""

    WIDTH = 20

    def __init__(self, stream: IO[str], total: int) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self.failed = 0
        self.tty = stream.isatty()

    def update(self, result: RunResult) -> None:
        self.done += 1
        self.failed += not result.ok
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        status = "ok" if result.ok else "FAILED"
        line = (
            f"[{bar}] {self.done}/{self.total} runs, {self.failed} failed; "
            f"run {result.index} {result.plan} after {result.after:.2f} s: {status}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()
