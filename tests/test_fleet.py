"""The fleet against a real PostgreSQL server: processes report, see and drive each other.

Each test runs one or more supervisors in this process, each with its own
FleetMember (a short interval, so the tests are quick), on a fresh database. Real
processes, real kills and the fleet page in a browser are in test_fleet_processes.py.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import psycopg
import pytest
import trio

import nursery_down as nd
from nursery_down._fleet import (
    FLEET_ENV,
    GONE_AFTER,
    FleetMember,
    fleet_database,
)
from nursery_down.queues import MemoryQueue, PostgresQueue
from nursery_down.testing import PostgresServer

#: Seconds between reports in these tests.
INTERVAL = 0.1
#: Every wait is bounded by this.
PATIENCE = 15.0


def held_app(name: str) -> nd.Supervisor:
    """An app whose service ``work`` holds one job until it drains, then finishes it."""
    sup = nd.Supervisor(name, grace=5.0)

    @sup.service
    async def work(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with ctx.job("held", topic="fleet"):
            await ctx.wait_draining()

    return sup


@asynccontextmanager
async def member_of(sup: nd.Supervisor, dsn: str) -> AsyncIterator[FleetMember]:
    """Run *sup* in the fleet at *dsn* until the block ends (it drains then)."""
    async with nd.open_supervisor(sup, fleet=False), trio.open_nursery() as nursery:
        member = FleetMember(sup, dsn, interval=INTERVAL)
        sup._fleet = member
        await nursery.start(member.serve)
        try:
            yield member
        finally:
            if sup.app_state != "stopped":
                sup.drain_nowait()
            await sup.wait_finished()
            nursery.cancel_scope.cancel()
    await member.aclose()


async def wait_view(
    member: FleetMember, what: str, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the fleet view until *predicate* holds (a state written by another task)."""
    with trio.fail_after(PATIENCE):
        while True:
            view = await member.view()
            if predicate(view):
                return view
            await trio.sleep(INTERVAL / 2)  # the database is polled: nothing to wait on


def process(view: dict[str, Any], member: FleetMember) -> dict[str, Any]:
    (found,) = [p for p in view["processes"] if p["id"] == member.id]
    assert isinstance(found, dict)
    return found


async def test_two_processes_see_each_other_and_one_drains_the_other(postgres_dsn: str) -> None:
    a, b = held_app("orders"), held_app("billing")
    async with member_of(a, postgres_dsn) as first, member_of(b, postgres_dsn) as second:
        view = await wait_view(
            first,
            "both processes running with their job",
            lambda v: (
                len(v["processes"]) == 2
                and all(p["state"] == "running" and p["in_flight"] == 1 for p in v["processes"])
            ),
        )
        seen = process(view, second)
        assert (seen["app"], seen["host"], seen["pid"]) == (
            "billing",
            socket.gethostname(),
            os.getpid(),
        )
        assert seen["name"] == f"{socket.gethostname()}:{os.getpid()}"
        assert (seen["generation"], seen["orphans"], seen["exit_code"]) == (1, 0, None)
        (service,) = seen["services"]
        assert (service["name"], service["state"], service["in_flight"]) == ("work", "running", 1)
        assert [job["key"] for job in service["jobs"]] == ["held"]
        assert view["this"] == first.id

        answer = await first.ask(second.id, "drain", None, actor="browser 10.0.0.7")
        assert answer["result"] == "accepted"
        assert (answer["process"], answer["action"], answer["service"]) == (
            second.id,
            "drain",
            None,
        )
        with trio.fail_after(PATIENCE):
            await b.wait_finished()
        assert b.exit_code == 0
        assert a.app_state == "running"  # the other process keeps working
        actions = [e for e in b.events() if e.kind == "action"]
        assert actions[-1].detail["actor"] == (f"browser 10.0.0.7 via the fleet, from {first.name}")
    view = await wait_view(
        first, "both stopped", lambda v: all(p["state"] == "stopped" for p in v["processes"])
    )
    assert [p["exit_code"] for p in view["processes"]] == [0, 0]
    await first.aclose()


async def test_a_refused_action_says_why(postgres_dsn: str) -> None:
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
        answer = await member.ask(member.id, "start", "nope", actor="cli 127.0.0.1")
        assert answer["result"].startswith("refused: unknown service 'nope'")
        answer = await member.ask(member.id, "upgrade", None, actor="cli 127.0.0.1")
        assert answer["result"].startswith("refused: supervisor 'orders' cannot upgrade itself")
        answer = await member.ask(member.id, "escalate", "work", actor="cli 127.0.0.1")
        assert answer["result"] == "accepted"
        with trio.fail_after(PATIENCE):
            await sup.wait_app_state("running")  # one service stopped; the app runs on
        assert sup.snapshot()["services"][0]["hard_cancelled"] == 0  # it finished on the drain


async def test_a_command_its_process_stopped_before_taking_is_answered(postgres_dsn: str) -> None:
    sup = held_app("orders")
    async with nd.open_supervisor(sup, fleet=False):
        # Registered, but not listening: it takes no command, as a process in its
        # last instant would not.
        quiet = FleetMember(sup, postgres_dsn, interval=INTERVAL)
        await quiet._report_once()
        asker = FleetMember(held_app("ops"), postgres_dsn, interval=INTERVAL)
        answers: list[dict[str, Any]] = []

        async def ask() -> None:
            answers.append(await asker.ask(quiet.id, "drain", None, actor="cli 127.0.0.1"))

        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                while not await asker._call(pending_commands, quiet.id):
                    await trio.sleep(INTERVAL / 2)  # written by the other task's thread
                await quiet._report_once(final=True)  # the process stops
        assert answers[0]["result"] == "refused: the process stopped before carrying it out"
        assert sup.app_state == "running"  # nothing was done
        sup.drain_nowait()
    await quiet.aclose()
    await asker.aclose()


def pending_commands(connection: psycopg.Connection[Any], process_id: str) -> int:
    row = connection.execute(
        "SELECT count(*) FROM nd_fleet_commands WHERE process_id = %s AND result IS NULL",
        (process_id,),
    ).fetchone()
    return int(row[0]) if row else 0


async def test_bad_asks_are_refused_before_they_reach_the_database(postgres_dsn: str) -> None:
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
        with pytest.raises(nd.UnknownProcessError, match="no process 'ffffffffffff' in the fleet"):
            await member.ask("ffffffffffff", "drain", None, actor="test")
        with pytest.raises(nd.ConfigurationError, match="unknown fleet action 'explode'"):
            await member.ask(member.id, "explode", None, actor="test")
        with pytest.raises(nd.ConfigurationError, match="start needs a service name"):
            await member.ask(member.id, "start", None, actor="test")
        with pytest.raises(nd.ConfigurationError, match="upgrade acts on a whole process"):
            await member.ask(member.id, "upgrade", "work", actor="test")
    with pytest.raises(nd.InvalidTransitionError, match="has stopped: it cannot drain"):
        await member.ask(member.id, "drain", None, actor="test")
    await member.aclose()


async def test_a_silent_process_is_shown_as_gone_with_its_jobs_as_orphans(
    postgres_dsn: str,
) -> None:
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(
            member, "the job reported", lambda v: [p["in_flight"] for p in v["processes"]] == [1]
        )
        # As if this process had been killed: its reports stop (here, they are dated back).
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO nd_fleet_processes (id, app, host, pid, version, generation, state,"
                " in_flight, interval, heartbeat_at) VALUES ('killedworker', 'orders',"
                " 'elsewhere', 41, '', 1, 'running', 3, %s, now() - interval '10 seconds')",
                (INTERVAL,),
            )
        view = await member.view()
        (killed,) = [p for p in view["processes"] if p["id"] == "killedworker"]
        assert (killed["state"], killed["orphans"], killed["name"]) == ("gone", 3, "elsewhere:41")
        assert killed["heartbeat_age"] > INTERVAL * GONE_AFTER
        with pytest.raises(nd.InvalidTransitionError, match="has gone away"):
            await member.ask("killedworker", "drain", None, actor="test")


async def test_the_database_away_never_holds_the_program_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dsn = f"postgresql://nobody:secret-password@127.0.0.1:{port}/nowhere"
    sup = held_app("orders")
    caplog.set_level(logging.INFO, logger="nursery_down")
    with trio.fail_after(PATIENCE):
        async with member_of(sup, dsn) as member:
            assert sup.app_state == "running"
            while not any("fleet:" in r.getMessage() for r in caplog.records):
                await trio.sleep(INTERVAL)  # the report task logs in its own time
            with pytest.raises(nd.FleetUnavailableError, match=rf"127\.0\.0\.1:{port}/nowhere"):
                await member.view()
    assert sup.exit_code == 0
    warnings = [r.getMessage() for r in caplog.records if "fleet:" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once, not at every report
    assert "cannot be reached" in warnings[0]
    assert "secret-password" not in caplog.text


async def test_a_fleet_database_is_found_from_a_postgres_queue(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FLEET_ENV, raising=False)

    async def handle(job: Any) -> None:
        pass

    plain = nd.Supervisor("plain")
    plain.add(nd.worker_pool(MemoryQueue(), handle), name="memory")
    assert fleet_database(plain, None) is None
    with pytest.raises(nd.ConfigurationError, match="no fleet database is known"):
        fleet_database(plain, True)

    shared = nd.Supervisor("shared")
    queue = PostgresQueue(postgres_dsn, name="invoices")
    shared.add(nd.worker_pool(queue, handle), name="invoices")
    assert fleet_database(shared, None) == postgres_dsn
    assert fleet_database(shared, False) is None
    assert fleet_database(shared, "postgresql://elsewhere/db") == "postgresql://elsewhere/db"
    monkeypatch.setenv(FLEET_ENV, "postgresql://from-env/db")
    assert fleet_database(plain, None) == "postgresql://from-env/db"
    with pytest.raises(nd.ConfigurationError, match="fleet must be a PostgreSQL connection"):
        fleet_database(plain, 3)  # type: ignore[arg-type]
    with pytest.raises(nd.ConfigurationError, match="fleet database must be a PostgreSQL"):
        FleetMember(plain, " ")


async def test_reports_carry_the_figures_of_the_postgres_queues(postgres_dsn: str) -> None:
    sup = nd.Supervisor("invoices", grace=5.0)
    queue = PostgresQueue(postgres_dsn, name="invoices")
    done = trio.Event()

    async def handle(job: Any) -> None:
        if job.payload == "last":
            done.set()

    sup.add(nd.worker_pool(queue, handle, workers=2), name="invoices")
    await queue.put_many(["a", "b", "last"])
    async with nd.open_supervisor(sup, fleet=False), trio.open_nursery() as nursery:
        member = FleetMember(sup, postgres_dsn, interval=INTERVAL, sources=[queue])
        await nursery.start(member.serve)
        with trio.fail_after(PATIENCE):
            await done.wait()
        view = await wait_view(
            member, "the queue's figures", lambda v: v["queues"] and v["queues"][0]["done"] >= 0
        )
        (figures,) = view["queues"]
        assert figures["name"] == "invoices"
        assert figures["reported_by"] == member.name
        assert {"queued", "leased", "done", "dead"} <= figures.keys()
        sup.drain_nowait()
        await sup.wait_finished()
        nursery.cancel_scope.cancel()
    await member.aclose()
    await queue.aclose()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fleet", "drain"], "fleet drain needs a PROCESS (its id, HOST:PID or PID)"),
        (
            ["fleet", "start", "3f9c1e07a2b4"],
            "fleet start needs a SERVICE: fleet start PROCESS SERVICE",
        ),
    ],
)
def test_fleet_command_usage_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from nursery_down._cli import main

    assert main([*argv, "--url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == f"nursery-down: error: {message}\n"


def test_fleet_command_refuses_an_unknown_action(capsys: pytest.CaptureFixture[str]) -> None:
    from nursery_down._cli import main

    with pytest.raises(SystemExit) as exited:
        main(["fleet", "explode", "3f9c1e07a2b4"])
    assert exited.value.code == 2
    assert "invalid choice: 'explode'" in capsys.readouterr().err


async def test_version_and_generation_come_from_the_environment(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NURSERY_DOWN_VERSION", "1.4.2\n\x1b[31m")
    monkeypatch.setenv("NURSERY_DOWN_GENERATION", "3")
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        view = await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
    (shown,) = view["processes"]
    assert (shown["version"], shown["generation"]) == ("1.4.2??[31m", 3)
    monkeypatch.setenv("NURSERY_DOWN_GENERATION", "many")
    assert FleetMember(sup, postgres_dsn).generation == 1


async def test_processes_that_ended_long_ago_are_forgotten(postgres_dsn: str) -> None:
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            for process_id, ended in (("ended-2h-ago", "2 hours"), ("ended-5m-ago", "5 minutes")):
                connection.execute(
                    "INSERT INTO nd_fleet_processes (id, app, host, pid, version, generation,"
                    " state, interval, heartbeat_at, stopped_at) VALUES (%s, 'orders', 'old',"
                    " 7, '', 1, 'stopped', 1, now() - %s::interval, now() - %s::interval)",
                    (process_id, ended, ended),
                )
        view = await wait_view(
            member,
            "the old process forgotten at the next report",
            lambda v: "ended-2h-ago" not in {p["id"] for p in v["processes"]},
        )
    assert {p["id"] for p in view["processes"]} == {member.id, "ended-5m-ago"}
    await member.aclose()


@pytest.mark.subprocess
async def test_a_process_reports_again_once_the_database_is_back(
    postgres_server: PostgresServer, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not postgres_server.owned:
        pytest.skip("the server of $NURSERY_DOWN_TEST_POSTGRES is not ours to stop")
    caplog.set_level(logging.INFO, logger="nursery_down")
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
        await trio.to_thread.run_sync(postgres_server.stop)
        try:
            with trio.fail_after(PATIENCE):
                while not any(
                    "keeps running and retries" in r.getMessage() for r in caplog.records
                ):
                    await trio.sleep(INTERVAL)  # the report task logs in its own time
            assert sup.app_state == "running"
        finally:
            await trio.to_thread.run_sync(postgres_server.start)
        with trio.fail_after(PATIENCE):
            while not any("answers again" in r.getMessage() for r in caplog.records):
                await trio.sleep(INTERVAL)
        view = await wait_view(
            member, "fresh reports", lambda v: v["processes"][0]["heartbeat_age"] < 1
        )
        assert view["processes"][0]["state"] == "running"
    await member.aclose()


async def test_the_fleet_page_api_and_actions_answer_503_while_the_database_is_away(
    nursery: trio.Nursery,
) -> None:
    import httpx

    from nursery_down.dashboard import serve_dashboard

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = "fleet-away-token-5e81d2"
    sup = held_app("orders")
    async with member_of(sup, f"postgresql://nobody@127.0.0.1:{port}/nowhere") as member:
        with trio.fail_after(PATIENCE):
            info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=token))
            async with httpx.AsyncClient(
                base_url=info.url, timeout=PATIENCE, headers={"Authorization": f"Bearer {token}"}
            ) as client:
                page = await client.get("/fleet")
                api = await client.get("/api/fleet")
                action = await client.post(f"/api/fleet/processes/{member.id}/drain")
    for response in (page, api, action):
        assert response.status_code == 503, response.text
        assert f"127.0.0.1:{port}/nowhere" in response.json()["error"]
    assert sup.exit_code == 0  # the app ran on, and drained when the block ended


async def test_the_cli_drains_a_process_named_by_host_and_pid(
    postgres_dsn: str, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    from nursery_down._cli import main
    from nursery_down.dashboard import serve_dashboard

    token = "fleet-cli-token-0b77a4"
    sup = held_app("orders")
    name = f"{socket.gethostname()}:{os.getpid()}"
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            # Others of the same pid on another host, and of the same host with another pid.
            for process_id, host, pid in (
                ("samepidother", "elsewhere", os.getpid()),
                ("samehostother", socket.gethostname(), os.getpid() + 1),
            ):
                connection.execute(
                    "INSERT INTO nd_fleet_processes (id, app, host, pid, version, generation,"
                    " state, interval, heartbeat_at) VALUES (%s, 'orders', %s, %s, '', 1,"
                    " 'running', 3600, now())",
                    (process_id, host, pid),
                )
        with trio.fail_after(PATIENCE):
            await wait_view(member, "registered", lambda v: len(v["processes"]) == 3)
            info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=token))
            code = await trio.to_thread.run_sync(
                main, ["fleet", "drain", name, "--url", info.url, "--token", token]
            )
            await sup.wait_finished()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"drain process {name} ({member.id}): accepted"
    assert sup.exit_code == 0
    [report] = sup.drain_reports()
    assert report["scope"] == "app"
    assert "via the fleet" in report["actor"]
    await member.aclose()


@pytest.mark.parametrize(("minutes", "listed"), [(59, True), (61, False)])
async def test_a_process_that_ended_is_listed_for_an_hour(
    postgres_dsn: str, minutes: int, listed: bool
) -> None:
    sup = held_app("orders")
    async with member_of(sup, postgres_dsn) as member:
        await wait_view(member, "registered", lambda v: len(v["processes"]) == 1)
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            for process_id, stopped in (("ended", True), ("silent", False)):
                # One that stopped, one that went silent (killed), both that long ago.
                connection.execute(
                    "INSERT INTO nd_fleet_processes (id, app, host, pid, version, generation,"
                    " state, interval, heartbeat_at, stopped_at) VALUES (%s, 'orders', 'old',"
                    " 7, '', 1, %s, 1, now() - make_interval(mins => %s),"
                    " CASE WHEN %s THEN now() - make_interval(mins => %s) END)",
                    (process_id, "stopped" if stopped else "running", minutes, stopped, minutes),
                )
            row = connection.execute("SELECT now()").fetchone()
            assert row is not None
            written = row[0]

        def reported_since(connection: psycopg.Connection[Any], process_id: str) -> bool:
            found = connection.execute(
                "SELECT heartbeat_at > %s FROM nd_fleet_processes WHERE id = %s",
                (written, process_id),
            ).fetchone()
            return bool(found and found[0])

        with trio.fail_after(PATIENCE):
            # Each report forgets, in its own transaction, what ended over an hour ago.
            while not await member._call(reported_since, member.id):
                await trio.sleep(INTERVAL / 2)  # the report task writes in its own time
        view = await member.view()
    ids = {p["id"] for p in view["processes"]}
    assert ids == ({member.id, "ended", "silent"} if listed else {member.id})
    await member.aclose()
