"""Service health: set by the service, found by its check, seen by others and by /readyz.

Timing rules (how often a check runs, its timeout) run under the mock clock: exact
and instant.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

import nursery_down as nd

#: Every wait is bounded by this (mock clock seconds: instant).
LIMIT = 120.0


def health_events(sup: nd.Supervisor, service: str) -> list[tuple[str | None, str | None, str]]:
    return [
        (e.previous, e.state, e.message)
        for e in sup.events()
        if e.kind == "health" and e.service == service
    ]


async def test_a_check_runs_every_interval_and_a_failure_makes_the_service_unhealthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("health", grace=5.0)
    runs: list[float] = []
    failing = False

    async def ping() -> None:
        runs.append(trio.current_time())
        if failing:
            raise ConnectionError("connection refused")

    @sup.service(health=ping, health_every=10.0)
    async def db(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            started = trio.current_time()
            await trio.sleep(25.0)
            assert [round(t - started, 6) for t in runs] == [0.0, 10.0, 20.0]
            assert sup.snapshot()["services"][0]["health"] == "ok"
            failing = True
            await trio.sleep(10.0)
            (service,) = sup.snapshot()["services"]
            assert (service["health"], service["health_reason"]) == (
                "unhealthy",
                "ConnectionError: connection refused",
            )
            assert sup.readiness() == {
                "ready": False,
                "state": "running",
                "reasons": ["service db is unhealthy: ConnectionError: connection refused"],
            }
            failing = False
            await trio.sleep(10.0)
            assert sup.snapshot()["services"][0]["health"] == "ok"
            assert sup.readiness()["ready"] is True
    assert health_events(sup, "db") == [
        ("ok", "unhealthy", "health ok -> unhealthy: ConnectionError: connection refused"),
        ("unhealthy", "ok", "health unhealthy -> ok"),
    ]
    # No check runs once the service left RUNNING.
    count = len(runs)
    await trio.sleep(60.0)
    assert len(runs) == count


async def test_a_check_that_hangs_times_out_and_one_that_reports_a_value_sets_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("health", grace=5.0)

    async def hang() -> None:
        await trio.sleep_forever()

    async def degraded(ctx: nd.ServiceContext) -> str:
        assert ctx.name == "cache"  # a check may take the context
        return "degraded"

    @sup.service(health=hang, health_every=10.0, health_timeout=2.0)
    async def db(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    @sup.service(health=degraded)
    async def cache(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            started = trio.current_time()
            await sup.wait_state("db", nd.ServiceState.RUNNING)
            await trio.sleep(2.5)
            db_snapshot, cache_snapshot = sup.snapshot()["services"]
    assert (db_snapshot["health"], db_snapshot["health_reason"]) == (
        "unhealthy",
        "its health check took longer than 2 s",
    )
    assert (cache_snapshot["health"], cache_snapshot["health_reason"]) == (
        "degraded",
        "reported by its health check",
    )
    assert trio.current_time() - started < LIMIT


async def test_a_service_follows_the_health_of_its_dependency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("ledger-app", grace=5.0)
    db_down = trio.Event()
    db_up = trio.Event()

    @sup.service
    async def db(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await db_down.wait()
        ctx.set_health("unhealthy", "replica lag 40 s")
        await db_up.wait()
        ctx.set_health("ok")
        await ctx.wait_draining()

    @sup.service(after=["db"])
    async def ledger(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        async with trio.open_nursery() as nursery:

            async def follow_db() -> None:
                while True:
                    await ctx.wait_health("db", healthy=False)
                    ctx.set_health("degraded", f"db is {ctx.health_of('db')}")
                    await ctx.wait_health("db")
                    ctx.set_health("ok")

            nursery.start_soon(follow_db)
            await ctx.wait_draining()
            nursery.cancel_scope.cancel()

    @sup.service(after=["ledger"], readiness=False)
    async def reports(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        with pytest.raises(nd.UnknownServiceError):
            ctx.health_of("nope")
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            db_down.set()
            await trio.sleep(1.0)
            services = {s["name"]: s for s in sup.snapshot()["services"]}
            assert (services["db"]["health"], services["db"]["health_reason"]) == (
                "unhealthy",
                "replica lag 40 s",
            )
            assert (services["ledger"]["health"], services["ledger"]["health_reason"]) == (
                "degraded",
                "db is unhealthy",
            )
            assert sup.readiness()["reasons"] == [
                "service db is unhealthy: replica lag 40 s",
                "service ledger is degraded: db is unhealthy",
            ]
            db_up.set()
            await trio.sleep(1.0)
            assert [s["health"] for s in sup.snapshot()["services"]] == ["ok", "ok", "ok"]
            # A service that opted out of readiness may stop; the app stays ready.
            await sup.drain("reports")
            await sup.wait_state("reports", nd.ServiceState.STOPPED)
            assert sup.readiness() == {"ready": True, "state": "running", "reasons": []}
            assert sup.readiness("reports")["reasons"] == ["service reports is stopped"]
            assert services["reports"]["readiness"] is False


async def test_a_new_run_starts_healthy(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("health", grace=5.0)
    crash = trio.Event()
    runs = 0

    @sup.service(restart="transient")
    async def worker(ctx: nd.ServiceContext) -> None:
        nonlocal runs
        runs += 1
        ctx.set_health("degraded", "warming up")
        ctx.ready()
        if runs == 1:  # the second run stays up, so the test can see it RUNNING
            await crash.wait()
            raise RuntimeError("crash")
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            assert sup.snapshot()["services"][0]["health"] == "degraded"
            crash.set()
            await sup.wait_state("worker", nd.ServiceState.BACKOFF)
            await sup.wait_state("worker", nd.ServiceState.RUNNING)
            assert [m for _, _, m in health_events(sup, "worker")][:2] == [
                "health ok -> degraded: warming up",
                "health degraded -> ok",
            ]


async def test_health_reasons_are_one_clean_line(autojump_clock: trio.testing.MockClock) -> None:
    sup = nd.Supervisor("health", grace=5.0)

    @sup.service
    async def worker(ctx: nd.ServiceContext) -> None:
        ctx.set_health("bad\nstate", "line one\nline two\x1b[31m" + "x" * 1000)
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            (service,) = sup.snapshot()["services"]
    assert service["health"] == "bad state"
    assert "\n" not in service["health_reason"]
    assert "\x1b" not in service["health_reason"]
    assert len(service["health_reason"]) <= 300


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"health": "not a function"}, "health must be an async function"),
        ({"health": lambda: None}, "health must be an async function"),
        ({"health_every": 0}, "health_every"),
        ({"health_every": float("inf")}, "health_every"),
        ({"health_timeout": -1}, "health_timeout"),
        ({"readiness": "no"}, "readiness must be True or False"),
    ],
)
def test_bad_health_options_say_what_to_fix(options: dict[str, object], message: str) -> None:
    sup = nd.Supervisor("health")

    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    with pytest.raises(nd.ConfigurationError, match=message):
        sup.add(service, **options)  # type: ignore[arg-type]


async def test_the_dashboard_shows_health_in_the_page_metrics_and_readyz(
    nursery: trio.Nursery,
) -> None:
    import httpx

    from nursery_down.dashboard import serve_dashboard

    sup = nd.Supervisor("health-page", grace=5.0)

    async def failing() -> None:
        raise OSError("disk full")

    @sup.service(health=failing, health_every=3600.0)
    async def archive(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    token = "health-test-token-4c1f9a"
    with trio.fail_after(30):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=token))
        async with httpx.AsyncClient(
            base_url=info.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            while sup.snapshot()["services"][0]["health"] != "unhealthy":
                await trio.sleep(0.01)  # the check runs in its own task
            ready = await client.get("/readyz")
            one = await client.get("/readyz?service=archive")
            metrics = (await client.get("/metrics")).text
            page = (await client.get("/")).text
        await sup.drain()
        await sup.wait_finished()
    assert ready.status_code == 503
    assert ready.json()["reasons"] == ["service archive is unhealthy: OSError: disk full"]
    assert one.status_code == 503
    assert 'nursery_down_service_healthy{app="health-page",service="archive"} 0.0' in metrics
    assert 'data-health="unhealthy"' in page
    assert "OSError: disk full" in page


async def test_by_default_a_check_runs_every_10_s_for_at_most_5_s_and_each_change_is_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="nursery_down")
    sup = nd.Supervisor("health", grace=5.0)
    runs: list[float] = []

    async def ping() -> None:
        runs.append(trio.current_time())
        if len(runs) == 2:
            await trio.sleep_forever()

    @sup.service(health=ping)
    async def db(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            started = trio.current_time()
            await wait_health_changes(sup, "db", 1)
            unhealthy_at = trio.current_time() - started
            await wait_health_changes(sup, "db", 2)
            healthy_at = trio.current_time() - started
    assert [t - started for t in runs][:3] == [0.0, 10.0, 20.0]
    assert (unhealthy_at, healthy_at) == (15.0, 20.0)
    logged = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("service db: health")
    ]
    assert logged == [
        (
            "WARNING",
            "service db: health ok -> unhealthy: its health check took longer than 5 s "
            "(health check)",
        ),
        ("INFO", "service db: health unhealthy -> ok (health check)"),
    ]


async def wait_health_changes(sup: nd.Supervisor, service: str, count: int) -> None:
    """Wait until *service* had *count* health changes (each one event)."""
    with sup.subscribe() as events:
        if len(health_events(sup, service)) >= count:
            return
        async for event in events:
            if event.kind == "health" and len(health_events(sup, service)) >= count:
                return
