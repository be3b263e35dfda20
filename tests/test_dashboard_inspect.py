"""GET /api/drains, where a job waits (/api/jobs/stack) and /debug/tasks, served for real."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

import nursery_down as nd
from tests.dashboard_helpers import DashboardInfo, serve_dashboard

TOKEN = "inspect-test-token-51c0"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 10.0


async def wait_for_the_database(ready: trio.Event) -> None:
    """A known function a job blocks in."""
    ready.set()
    await trio.sleep_forever()


@pytest.fixture
async def served(
    nursery: trio.Nursery,
) -> AsyncIterator[tuple[nd.Supervisor, DashboardInfo, httpx.AsyncClient]]:
    sup = nd.Supervisor(name="inspect", grace=30.0)
    ready = trio.Event()

    @sup.service
    async def stuck(ctx: nd.ServiceContext) -> None:
        async with ctx.job("order/17"):
            ctx.ready()
            await wait_for_the_database(ready)

    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        await ready.wait()
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
    async with httpx.AsyncClient(base_url=info.url, timeout=LIMIT) as client:
        yield sup, info, client
    with trio.fail_after(LIMIT):
        if sup.running:
            await sup.escalate()
        await sup.wait_finished()


async def test_a_stuck_job_shows_the_function_it_waits_in(
    served: tuple[nd.Supervisor, DashboardInfo, httpx.AsyncClient],
) -> None:
    _, _, client = served
    with trio.fail_after(LIMIT):
        answer = await client.get(
            "/api/jobs/stack", params={"service": "stuck", "key": "order/17"}, headers=BEARER
        )
        by_path = await client.get("/api/services/stuck/jobs/order%2F17/stack", headers=BEARER)
        missing = await client.get(
            "/api/jobs/stack", params={"service": "stuck", "key": "nope"}, headers=BEARER
        )
        refused = await client.get(
            "/api/jobs/stack", params={"service": "stuck", "key": "order/17"}
        )
    assert answer.status_code == 200
    stack = answer.json()
    functions = [frame["function"] for frame in stack["frames"]]
    assert "wait_for_the_database" in functions
    # Outermost first: the service's runner, its function, then where it waits.
    assert functions[0] == "Services._run_service"
    assert functions.index("served.<locals>.stuck") < functions.index("wait_for_the_database")
    assert "wait_for_the_database -> " in stack["chain"]
    frame = next(f for f in stack["frames"] if f["function"] == "wait_for_the_database")
    assert frame["file"].endswith("test_dashboard_inspect.py")
    assert isinstance(frame["line"], int)
    assert set(frame) == {"function", "file", "line"}  # never a local value
    assert by_path.json()["frames"] == stack["frames"]
    assert missing.status_code == 404
    assert "no job 'nope' in flight" in missing.json()["error"]
    assert refused.status_code == 401


async def test_debug_tasks_lists_every_task_with_its_await(
    served: tuple[nd.Supervisor, DashboardInfo, httpx.AsyncClient],
) -> None:
    _, _, client = served
    with trio.fail_after(LIMIT):
        answer = await client.get("/debug/tasks", headers=BEARER)
        refused = await client.get("/debug/tasks")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "task service stuck" in answer.text
    assert "wait_for_the_database at " in answer.text
    assert refused.status_code == 401


async def test_api_drains_lists_the_last_drain_reports(
    served: tuple[nd.Supervisor, DashboardInfo, httpx.AsyncClient],
) -> None:
    sup, _, client = served
    with trio.fail_after(LIMIT):
        before = await client.get("/api/drains", headers=BEARER)
        drained = await client.post("/api/services/stuck/escalate", headers=BEARER, json={})
        await sup.wait_state("stuck", nd.ServiceState.STOPPED)
        after = await client.get("/api/drains", headers=BEARER)
        refused = await client.get("/api/drains")
    assert before.json() == {"drains": []}
    assert drained.status_code == 202
    [report] = after.json()["drains"]
    assert report["service"] == "stuck"
    assert report["action"] == "escalate"
    assert report["actor"].endswith(" 127.0.0.1")  # who asked, and from where
    assert (report["jobs"], report["hard_cancelled"], report["grace"]) == (1, 1, 0.0)
    assert report["longest"]["key"] == "order/17"
    assert refused.status_code == 401
