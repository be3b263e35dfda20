"""What a draining generation reports to the one that replaced it, over a real pipe."""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import nursery_down as nd
from nursery_down._generations import (
    REPORT_JOBS,
    TEXT_LIMIT,
    PreviousGeneration,
    drain_report,
    send_message,
    upgrade_request,
)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    try:
        yield read, write
    finally:
        for fd in (read, write):
            with contextlib.suppress(OSError):  # closed by the test
                os.close(fd)


def lines_in(read: int) -> list[bytes]:
    """Every whole line waiting in the pipe, without blocking."""
    os.set_blocking(read, False)
    data = b""
    while True:
        try:
            chunk = os.read(read, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    assert data.endswith(b"\n") or not data, "a message was cut in half"
    return data.splitlines()


def snapshot_with(
    jobs: Sequence[tuple[str, Any, float, float | None]], **app: Any
) -> dict[str, Any]:
    """A snapshot of one service per distinct name, with (service, key, age, deadline) jobs."""
    services: dict[str, dict[str, Any]] = {}
    for service, key, age, deadline in jobs:
        entry = services.setdefault(service, {"name": service, "in_flight": 0, "jobs": []})
        entry["in_flight"] += 1
        entry["jobs"].append({"key": key, "age": age, "deadline": deadline})
    base = {"pid": 4242, "state": "draining", "exit_code": None, "grace_deadline": None}
    return {**base, **app, "services": list(services.values())}


def test_the_successor_learns_who_asked_and_what_is_still_running(
    pipe: tuple[int, int],
) -> None:
    read, write = pipe
    now = time.time()
    assert send_message(write, upgrade_request("signal SIGUSR2", new_pid=99))
    snapshot = snapshot_with(
        [("workers", "msg-1", 4.0, now + 26.0), ("workers", 17, 1.0, now + 26.0)],
        grace_deadline=now + 26.0,
    )
    assert send_message(write, drain_report(snapshot))

    previous = PreviousGeneration(pid=os.getpid())
    assert previous.view()["state"] == "running"  # nothing reported yet
    said = [previous.receive(line) for line in lines_in(read)]
    assert said == [
        f"upgrade asked by signal SIGUSR2 in the previous generation (pid {os.getpid()})",
        None,
    ]
    view = previous.view()
    assert view["state"] == "draining"
    assert (view["pid"], view["asked_by"], view["in_flight"]) == (
        os.getpid(),
        "signal SIGUSR2",
        2,
    )
    assert [(job["service"], job["key"]) for job in view["jobs"]] == [
        ("workers", "msg-1"),  # the oldest first
        ("workers", 17),
    ]
    assert 3.5 < view["jobs"][0]["age"] < 60
    assert 0 < view["jobs"][0]["time_left"] <= 26.0
    assert 0 < view["time_left"] <= 26.0
    assert view["exit_code"] is None
    json.dumps(view, allow_nan=False)


def test_the_last_report_and_the_exit_are_shown(pipe: tuple[int, int]) -> None:
    read, write = pipe
    send_message(write, drain_report(snapshot_with([], state="stopped", exit_code=3)))
    previous = PreviousGeneration(pid=7)
    for line in lines_in(read):
        previous.receive(line)
    assert (previous.view()["state"], previous.exit_code) == ("stopped", 3)
    previous.exited = True
    view = previous.view()
    assert (view["state"], view["exit_code"], view["jobs"], view["time_left"]) == (
        "exited",
        3,
        [],
        None,
    )


def test_a_report_always_fits_one_atomic_write(pipe: tuple[int, int]) -> None:
    read, write = pipe
    huge = "\u2028é" * 5000  # escaped by JSON: six bytes a character
    jobs = [("service-" + "x" * 500, huge + str(i), float(i), None) for i in range(200)]
    report = drain_report(snapshot_with(jobs))
    assert len(report["jobs"]) == REPORT_JOBS
    assert send_message(write, report)
    (line,) = lines_in(read)
    assert len(line) + 1 <= select.PIPE_BUF
    previous = PreviousGeneration(pid=1)
    previous.receive(line)
    view = previous.view()
    assert view["in_flight"] == 200
    assert 0 < len(view["jobs"]) < REPORT_JOBS
    assert view["jobs_hidden"] == 200 - len(view["jobs"])
    assert all(len(job["key"]) <= TEXT_LIMIT for job in view["jobs"])


def test_a_full_pipe_skips_a_report_and_never_blocks(pipe: tuple[int, int]) -> None:
    read, write = pipe
    report = drain_report(snapshot_with([("workers", "a", 1.0, None)]))
    os.set_blocking(write, False)
    for size in (4096, 1):  # the reader is not reading: fill the pipe to the last byte
        for _ in range(1_000_000):
            try:
                os.write(write, b"x" * size)
            except BlockingIOError:
                break
    assert send_message(write, report)  # skipped, without blocking
    os.set_blocking(read, False)
    while os.read(read, 65536) != b"" and select.select([read], [], [], 0)[0]:
        pass  # empty it: nothing of the report was written
    assert send_message(write, report)
    (line,) = lines_in(read)
    assert json.loads(line)["in_flight"] == 1


def test_a_reader_that_went_away_ends_the_reports(pipe: tuple[int, int]) -> None:
    read, write = pipe
    os.close(read)
    assert not send_message(write, drain_report(snapshot_with([])))


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"state": "exploded", "in_flight": 0, "exit_code": null, "jobs": []}',
        b'{"state": "draining", "in_flight": -1, "exit_code": null, "jobs": []}',
        b'{"state": "draining", "in_flight": 0, "exit_code": 900, "jobs": []}',
        b'{"state": "draining", "in_flight": 0, "exit_code": null, "jobs": {}}',
        b'{"state": "draining", "in_flight": 1, "exit_code": null, "grace_deadline": NaN,'
        b' "jobs": []}',
        b'{"state": "draining", "in_flight": 1, "exit_code": null,'
        b' "jobs": [{"service": "w", "key": 1, "started": Infinity, "deadline": null}]}',
        b'{"asked_by": "x", "asked_at": NaN}',
        b'{"asked_by": "", "asked_at": 1.0}',
    ],
)
def test_a_bad_message_is_dropped_and_the_last_good_report_kept(line: bytes) -> None:
    previous = PreviousGeneration(pid=5)
    good = json.dumps(drain_report(snapshot_with([("workers", "kept", 1.0, None)])))
    previous.receive(good.encode())
    assert previous.receive(line) is None
    view = previous.view()
    assert (view["state"], [job["key"] for job in view["jobs"]]) == ("draining", ["kept"])
    assert view["asked_by"] is None
    json.dumps(view, allow_nan=False)


def test_a_generation_that_replaced_none_says_so_in_its_snapshot() -> None:
    sup = nd.Supervisor("plain")
    assert sup.snapshot()["previous_generation"] is None
