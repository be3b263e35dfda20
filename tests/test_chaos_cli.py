"""``nursery-down chaos``: options, the report, and the proof on examples/queue_worker.py.

The proof runs the command on the example with scaled-down job times: 20 runs mixing
TERM and INT, 20 runs with KILL, 5 with TERM+TERM; nothing may be lost, and the
only jobs run twice are jobs in flight at a kill. Set ``NURSERY_DOWN_CHAOS_SEED``
to replay the seed a failure names.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nursery_down._cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
WORKER = f"{ROOT / 'examples' / 'queue_worker.py'}:sup"
MEMORY_WORKER = f"{ROOT / 'tests' / 'programs' / 'chaos_memory.py'}:sup"
SEED = int(os.environ.get("NURSERY_DOWN_CHAOS_SEED") or random.randrange(2**31))
#: The example scaled down: jobs of 0.08-0.12 s, 3 workers, 20 jobs a second.
FAST = [
    "--env=QUEUE_RATE=20",
    "--env=QUEUE_JOB_SECONDS=0.1",
    "--env=QUEUE_WORKERS=3",
    "--env=QUEUE_DASHBOARD=off",
    "--after=0.3..1.0",
    "--exit-within=10",
    "--timeout=30",
]


def chaos(*argv: str) -> int:
    """Run ``nursery-down chaos ARGV...`` through the command's own entry point, in process."""
    return main(["chaos", *argv])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--runs=0", "argument --runs: expected at least 1, got 0"),
        ("--signal=USR1", "argument --signal: unknown signal 'USR1'; use one of TERM, INT,"),
        ("--after=2..1", "argument --after: MIN is above MAX in '2..1'"),
        ("--after=soon", "argument --after: expected seconds, got 'soon'"),
        ("--env=NOEQUALS", "argument --env: expected NAME=VALUE, got 'NOEQUALS'"),
        ("--exit-within=0", "argument --exit-within: expected seconds > 0, got '0'"),
        ("--seed=x", "argument --seed: invalid int value: 'x'"),
    ],
)
def test_a_bad_option_is_one_clear_line_and_exit_2(
    option: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        chaos(WORKER, option)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("nursery-down chaos: error: ")
    assert message in err


def test_no_target_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        chaos("--runs=1")
    assert exited.value.code == 2
    assert "the following arguments are required: TARGET" in capsys.readouterr().err


def test_signals_are_case_insensitive_and_may_name_sig() -> None:
    parser = build_parser()
    args = parser.parse_args(["chaos", "x.py:sup", "--signal=sigterm+term", "--signal=kill"])
    assert args.signals == ["TERM+TERM", "KILL"]
    assert args.after == (0.5, 2.0)
    args = parser.parse_args(["chaos", "--after=1", "--", sys.executable, "-c", "pass"])
    assert args.target == [sys.executable, "-c", "pass"]
    assert args.after == (1.0, 1.0)


@pytest.mark.subprocess
def test_a_target_that_cannot_start_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert chaos(f"{tmp_path / 'missing.py'}:sup", "--runs=3", "--timeout=30") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("nursery-down chaos: error: TARGET exited 2 before it was ready:")
    assert "no such file" in err[-1]


def check_proof(report: dict[str, Any], runs: int, plans: set[str]) -> None:
    where = f"(seed {report['seed']}): {report['verdict']}"
    assert report["runs"] == runs, where
    assert report["lost"] == 0, where
    assert report["unexpected"] == 0, where
    assert report["duplicated"] == report["duplicated_in_flight_at_kill"], where
    assert report["failed_runs"] == [], where
    assert {run["signal"] for run in report["details"]} <= plans
    for run in report["details"]:
        assert run["ok"], where
        assert run["lost"] == [], where
        in_flight = set(run["in_flight_at_kill"])
        for duplicate in run["duplicated"]:
            assert duplicate["in_flight_at_kill"], where
            assert duplicate["job"] in in_flight, where


@pytest.mark.subprocess
def test_term_and_int_at_random_instants_lose_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "report.json"
    code = chaos(
        WORKER, "--runs=20", "--signal=TERM", "--signal=INT", f"--seed={SEED}", *FAST,
        f"--json={report_path}",
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert code == 0, report["verdict"]
    check_proof(report, 20, {"TERM", "INT"})
    assert report["duplicated"] == 0  # no kill: nothing may run twice
    assert all(run["exit_codes"] == [0] for run in report["details"])
    assert report["max_exit_seconds"] < 10
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split()[:4] == ["RUN", "SEED", "SIGNAL", "AFTER"]
    assert out.splitlines()[-1].startswith("OK: 20 runs")
    assert err.count("[") == 20  # a progress line per run: stderr is not a terminal here
    assert "20/20 runs, 0 failed" in err


@pytest.mark.subprocess
def test_kill_at_random_instants_loses_nothing_and_repeats_only_jobs_in_flight(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    code = chaos(
        WORKER, "--runs=20", "--signal=KILL", f"--seed={SEED}", *FAST, f"--json={report_path}"
    )
    report = json.loads(report_path.read_text())
    assert code == 0, report["verdict"]
    check_proof(report, 20, {"KILL"})
    for run in report["details"]:
        assert run["exit_codes"] == [-9, 0], run  # killed, then restarted and drained
    # With 3 workers busy most of the time, kills do hit jobs: the check is not vacuous.
    assert sum(len(run["in_flight_at_kill"]) for run in report["details"]) > 0
    assert report["duplicated"] > 0


@pytest.mark.subprocess
def test_a_second_term_during_the_drain_loses_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    code = chaos(
        WORKER, "--runs=5", "--signal=TERM+TERM", f"--seed={SEED}", *FAST,
        f"--json={report_path}", f"--workdir={tmp_path / 'runs'}",
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert code == 0, report["verdict"]
    check_proof(report, 5, {"TERM+TERM"})
    for run in report["details"]:
        assert run["exit_codes"][0] in (0, 3), run
        assert Path(run["directory"], "history.jsonl").exists()


@pytest.mark.subprocess
def test_a_failing_run_is_named_with_its_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An in-memory queue under SIGKILL loses its jobs: the command must say so.
    report_path = tmp_path / "report.json"
    code = chaos(
        MEMORY_WORKER, "--runs=2", "--signal=KILL", "--seed=7", "--after=0.3..0.5",
        "--timeout=30", f"--json={report_path}",
    )  # fmt: skip
    assert code == 1
    report = json.loads(report_path.read_text())
    assert report["lost"] > 0
    assert not report["ok"]
    assert [run["seed"] for run in report["failed_runs"]] == [7, 8]
    out = capsys.readouterr().out
    assert "FAILED: 2 runs (seed 7)" in out
    assert "  run 0 (seed 7, KILL after " in out
    assert "): lost " in out
    assert "replay the first with: --seed 7 --runs 1" in out


@pytest.mark.subprocess
def test_hup_then_term_and_a_command_line_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = chaos(
        "--runs=1", "--signal=HUP", "--seed=3", *FAST, "--ready-line=every service started",
        "--", sys.executable, "-m", "nursery_down", "run", WORKER, "--no-dashboard",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "HUP" in out.splitlines()[1]


def test_the_installed_command_runs_chaos(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "nursery_down", "chaos", WORKER, "--runs=2"),
            *("--signal=TERM", f"--seed={SEED}", *FAST, f"--json={report_path}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert (report["runs"], report["lost"]) == (2, 0)


@pytest.mark.subprocess
def test_an_upgrade_at_random_instants_loses_and_repeats_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    code = chaos(
        WORKER, "--runs=3", "--signal=USR2", f"--seed={SEED}", *FAST, f"--json={report_path}"
    )
    report = json.loads(report_path.read_text())
    assert code == 0, report["verdict"]
    check_proof(report, 3, {"USR2"})
    assert report["duplicated"] == 0  # both generations consumed: leases kept each job to one
    # The harness's own child is the old generation: it exited 0 after the hand-over.
    assert all(run["exit_codes"] == [0] for run in report["details"])


QUEUE_ENV_WORKER = f"{ROOT / 'tests' / 'programs' / 'queue_env_worker.py'}:sup"


def test_by_default_the_queue_path_is_in_queue_path_and_a_stop_has_30_s() -> None:
    args = build_parser().parse_args(["chaos", "x.py:sup"])
    assert (args.queue_env, args.exit_within) == ("QUEUE_PATH", 30.0)


@pytest.mark.subprocess
def test_queue_env_names_the_variable_the_target_reads_its_queue_path_from(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    code = chaos(
        QUEUE_ENV_WORKER, "--queue-env=WORKER_JOBS_FILE", "--runs=1", "--signal=TERM",
        f"--seed={SEED}", "--after=0.3..0.6", "--exit-within=10", "--timeout=30",
        f"--json={report_path}", f"--workdir={tmp_path / 'runs'}",
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert code == 0, report["verdict"]
    check_proof(report, 1, {"TERM"})
    (run,) = report["details"]
    assert run["exit_codes"] == [0]
    assert run["acked"] > 0
    assert (tmp_path / "runs" / "run-000" / "queue.sqlite3").exists()


@pytest.mark.subprocess
def test_the_harness_hands_the_queue_path_in_the_variable_it_is_given(tmp_path: Path) -> None:
    from nursery_down.testing import ChaosHarness

    with ChaosHarness(tmp_path / "chaos", queue_env="WORKER_JOBS_FILE", patience=30.0) as harness:
        target = harness.start(QUEUE_ENV_WORKER)
        running = target.wait_in_flight(1)
        target.send("TERM")
        assert target.wait_exit() == 0
        report = harness.check()
    assert report.ok, report.describe()
    assert set(running) <= report.acked
    assert harness.queue_path.exists()


@pytest.mark.subprocess
def test_exit_within_fails_a_run_whose_graceful_stop_is_too_slow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Jobs of about 2 s are in flight at the TERM: the drain lets them finish, so the
    # target exits 0, but later than half a second after the signal.
    report_path = tmp_path / "report.json"
    code = chaos(
        WORKER, "--runs=1", "--signal=TERM", f"--seed={SEED}", "--env=QUEUE_RATE=20",
        "--env=QUEUE_JOB_SECONDS=2", "--env=QUEUE_WORKERS=3", "--env=QUEUE_DASHBOARD=off",
        "--after=0.5..0.5", "--exit-within=0.5", "--timeout=30", f"--json={report_path}",
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert code == 1, report["verdict"]
    assert report["lost"] == 0
    (failed,) = report["failed_runs"]
    (problem,) = failed["problems"]
    assert problem.endswith("still ran 0.5 s after SIGTERM")
    assert "still ran 0.5 s after SIGTERM" in capsys.readouterr().out
