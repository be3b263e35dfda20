"""Each service's job sources: figures and rates in the snapshot, dead letters over HTTP.

The supervisors run in this process with the real dashboard served by hypercorn; the
dead-letter actions run against a real PostgresQueue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import nursery_down as nd
from nursery_down.dashboard import serve_dashboard
from nursery_down.queues import MemoryQueue, PostgresQueue, QueuedJob
from tests.dashboard_helpers import CHROMIUM, CHROMIUM_ARGS, run_program
from tests.polling import wait_for

TOKEN = "sources-test-token-7d21c0"
LIMIT = 30.0


async def always_fails(job: QueuedJob) -> None:
    raise ValueError(f"cannot handle {job.payload!r}")


async def wait_figures(sup: nd.Supervisor, predicate: Any) -> dict[str, Any]:
    """Poll the snapshot until the first source of the first service satisfies *predicate*
    (the watch reads figures in its own time)."""
    while True:
        (source,) = sup.snapshot()["services"][0]["sources"]
        if predicate(source):
            assert isinstance(source, dict)
            return source
        await trio.sleep(0.05)


async def test_a_worker_pools_source_and_its_rates_are_in_the_snapshot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue(max_attempts=1)
    extra = MemoryQueue()
    sup = nd.Supervisor("sources")
    sup.add(nd.worker_pool(queue, always_fails, workers=2), name="pool", sources=[extra])
    for number in range(10):
        queue.put_nowait({"n": number})
    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            await trio.sleep(5.0)
            first, second = sup.snapshot()["services"][0]["sources"]
            assert (first["index"], first["name"]) == (0, "MemoryQueue")
            assert (first["queued"], first["leased"], first["done"], first["dead"]) == (0, 0, 0, 10)
            assert first["dead_letters"] == ["list", "requeue", "discard"]
            assert second["index"] == 1
            for number in range(20):
                queue.put_nowait({"n": number})
            await trio.sleep(2.0)
            (first, _) = sup.snapshot()["services"][0]["sources"]
    assert first["dead"] == 30
    assert first["rate_in"] == pytest.approx(10.0)  # 20 jobs in 2 s
    dead = await sup.dead_letters("pool")
    # In the order they died: the first two ran together on the two workers.
    assert sorted(job.payload["n"] for job in dead[:2]) == [0, 1]
    with pytest.raises(nd.UnknownSourceError, match="has no job source #2"):
        await sup.dead_letters("pool", source=2)

    class NoDeadLetters:  # a source of the user's that keeps none
        async def claim(self) -> None: ...
        async def ack(self, job: object) -> None: ...
        async def release(self, job: object) -> None: ...
        async def fail(self, job: object, error: object) -> None: ...

    plain = nd.Supervisor("plain")
    plain.add(nd.worker_pool(MemoryQueue(), always_fails), name="pool", sources=[NoDeadLetters()])
    with pytest.raises(nd.InvalidTransitionError, match="cannot list its dead letters"):
        await plain.dead_letters("pool", source=1)
    with pytest.raises(nd.InvalidTransitionError, match="cannot requeue its dead letters"):
        await plain.requeue_dead_letters("pool", source=1, actor="test")
    # MemoryQueue keeps them: requeued, they run (and fail) again.
    assert queue.requeue_dead_letters([1, 2, 10**6]) == 2
    assert queue.purge_dead_letters() == 28
    assert queue.statistics().queued == 2
    with pytest.raises(nd.UnknownServiceError):
        await sup.dead_letters("nope")


def test_sources_must_be_job_sources() -> None:
    sup = nd.Supervisor("sources")

    async def service(ctx: nd.ServiceContext) -> None:
        ctx.ready()

    with pytest.raises(nd.ConfigurationError, match="is not a job source"):
        sup.add(service, sources=[object()])  # type: ignore[list-item]
    with pytest.raises(nd.ConfigurationError, match="must be a list of job sources"):
        sup.add(service, sources="queue")  # type: ignore[arg-type]


@dataclass
class Served:
    sup: nd.Supervisor
    client: httpx.AsyncClient
    queue: PostgresQueue


@pytest.fixture
async def served(nursery: trio.Nursery, postgres_dsn: str) -> AsyncIterator[Served]:
    queue = PostgresQueue(postgres_dsn, name="invoices", max_attempts=1)
    sup = nd.Supervisor("dead-letters")
    sup.add(nd.worker_pool(queue, always_fails, workers=2), name="invoices")
    await queue.put_many([{"invoice": n, "note": "x" * 500} for n in range(5)])
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
        await wait_figures(sup, lambda source: source["dead"] == 5)
    async with httpx.AsyncClient(
        base_url=info.url, timeout=LIMIT, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        yield Served(sup, client, queue)
    with trio.fail_after(LIMIT):
        await sup.drain()
        await sup.wait_finished()
        await queue.aclose()


async def test_dead_letters_are_listed_requeued_and_discarded_over_http(served: Served) -> None:
    client = served.client
    with trio.fail_after(LIMIT):
        listed = await client.get("/api/services/invoices/sources/0/dead")
        assert listed.status_code == 200
        body = listed.json()
        assert body["total"] == 5
        # Listed in the order they died; two workers fail them at once, so find job 0.
        (first,) = [d for d in body["dead"] if d["preview"].startswith('{"invoice":0,')]
        assert first["error"].startswith("ValueError: cannot handle {'invoice': 0, 'note': 'xxx")
        assert first["preview"].startswith('{"invoice":0,"note":"xxx')
        assert first["preview"].endswith("…")
        assert len(first["preview"]) == 120
        full = await client.get(f"/api/services/invoices/sources/0/dead?full={first['id']}")
        assert full.json()["payload"] == {"invoice": 0, "note": "x" * 500}

        nothing = await client.post("/api/services/invoices/sources/0/dead/requeue", json={})
        assert nothing.status_code == 400
        assert "name the dead letters" in nothing.json()["error"]
        requeued = await client.post(
            "/api/services/invoices/sources/0/dead/requeue", json={"ids": [first["id"]]}
        )
        assert (requeued.status_code, requeued.json()["requeued"]) == (202, 1)
        # The requeued job fails again (max_attempts=1) and comes back dead: still 5.
        await wait_figures(served.sup, lambda source: source["dead"] == 5)
        discarded = await client.post(
            "/api/services/invoices/sources/0/dead/discard", json={"all": True}
        )
        assert (discarded.status_code, discarded.json()["discarded"]) == (202, 5)
        source = await wait_figures(served.sup, lambda source: source["dead"] == 0)
    assert source["dead_letters"] == ["list", "requeue", "discard"]
    actions = [e.message for e in served.sup.events() if e.kind == "action"]
    for expected in ("requeue 1 dead letters", "discard all dead letters"):
        assert any(m.startswith(f"{expected} of invoices in service invoices") for m in actions)


async def test_dead_letter_routes_refuse_what_they_cannot_do(served: Served) -> None:
    cases: list[tuple[str, str, Any, int]] = [
        ("GET", "/api/services/nope/sources/0/dead", None, 404),
        ("GET", "/api/services/invoices/sources/7/dead", None, 404),
        ("GET", "/api/services/invoices/sources/0/dead?full=999999", None, 404),
        ("POST", "/api/services/invoices/sources/0/dead/requeue", {"ids": ["x"]}, 400),
        ("POST", "/api/services/invoices/sources/0/dead/requeue", {"ids": [True]}, 400),
        ("POST", "/api/services/invoices/sources/0/dead/requeue", {"ids": [1], "all": True}, 400),
        ("POST", "/api/services/invoices/sources/0/dead/requeue", {"ids": [10**400]}, 400),
        ("POST", "/api/services/invoices/sources/0/dead/explode", {"all": True}, 404),
        ("GET", "/api/services/invoices/sources/0/dead/requeue", None, 405),
    ]
    with trio.fail_after(LIMIT):
        for method, path, body, status in cases:
            response = await served.client.request(method, path, json=body)
            assert response.status_code == status, (path, response.text)
            assert "error" in response.json()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")
def test_an_operator_requeues_and_discards_dead_letters_from_the_page(
    tmp_path: Path, postgres_dsn: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    target = str(Path(__file__).parent / "programs" / "dead_letters_app.py") + ":sup"
    with (
        run_program(tmp_path, target=target, DEAD_DSN=postgres_dsn) as program,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{program.url}/?token={program.token}")
            orders = page.locator('.service[data-service="orders"]')
            summary = orders.locator('.source[data-source="0"] [data-field="source_summary"]')
            expect(summary).to_contain_text("dead 3")
            orders.locator("details.dead summary").click()
            listing = orders.locator('details.dead [data-field="dead_list"]')
            expect(listing).to_contain_text("3 dead letters.")
            expect(listing).to_contain_text("ValueError: order 0 is poison <b>")  # as text
            listing.locator("tr", has_text='"order":1').get_by_role(
                "button", name="Requeue"
            ).click()
            expect(page.locator("#notice")).to_contain_text(
                "Requeue: dead letters of orders: 1 done."
            )
            # The requeued job fails again and is dead again; discard them all.
            expect(summary).to_contain_text("dead 3")
            listing.get_by_role("button", name="Discard all").click()
            expect(page.locator("#notice")).to_contain_text(
                "Discard all: dead letters of orders: 3 done."
            )
            expect(listing).to_contain_text("0 dead letters.")
            expect(summary).to_contain_text("dead 0")
            assert errors == []
        finally:
            browser.close()
        assert program.terminate()[0] == 0
        assert "action: requeue 1 dead letters of orders in service orders by browser" in (
            program.stderr()
        )


def test_the_cli_lists_requeues_and_discards_dead_letters(
    tmp_path: Path, postgres_dsn: str
) -> None:
    target = str(Path(__file__).parent / "programs" / "dead_letters_app.py") + ":sup"
    with run_program(tmp_path, target=target, DEAD_DSN=postgres_dsn) as program:

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            environment = {k: v for k, v in os.environ.items() if not k.startswith("NURSERY_DOWN_")}
            return subprocess.run(
                [sys.executable, "-m", "nursery_down", *args, "--url", program.url],
                env={**environment, "NURSERY_DOWN_TOKEN": program.token},
                capture_output=True,
                text=True,
                timeout=LIMIT,
                check=False,
            )

        def dead_count() -> int:
            (source,) = program.service("orders")["sources"]
            return int(source["dead"] or 0)

        wait_for(lambda: dead_count() == 3, what="three dead letters", process=program.process)
        listed = cli("dead", "list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[0].split() == [
            "SERVICE",
            "SOURCE",
            "ID",
            "ATTEMPTS",
            "ERROR",
            "PAYLOAD",
        ]
        assert len(listed.stdout.splitlines()) == 4
        assert "ValueError: order 0 is poison <b>" in listed.stdout
        ids = [
            job["id"]
            for job in json.loads(cli("dead", "list", "orders", "--json").stdout)[0]["dead"]
        ]
        requeued = cli("dead", "requeue", "orders", str(ids[0]))
        assert requeued.stdout.strip() == "requeued 1 dead letters of orders (source 0)"
        status = cli("status")
        assert "job sources:" in status.stdout
        assert "orders source orders: queued" in status.stdout
        wait_for(
            lambda: dead_count() == 3, what="the requeued job dead again", process=program.process
        )
        discarded = cli("dead", "discard", "orders", "--all")
        assert discarded.stdout.strip() == "discarded 3 dead letters of orders (source 0)"
        assert cli("dead", "list").stdout.strip() == "no dead letters"
        for args, message in [
            (("dead", "requeue"), "dead requeue needs a SERVICE"),
            (("dead", "requeue", "orders"), "name the ids, or pass --all"),
            (("dead", "discard", "orders", "1", "--all"), "name the ids, or pass --all"),
            (("dead", "list", "--all"), "dead list takes no ids and no --all"),
            (("dead", "list", "nope"), "unknown service 'nope'"),
            (("dead", "list", "orders", "--source", "3"), "has no job source #3"),
            (("dead", "requeue", "orders", "abc"), "a job id is a whole number"),
        ]:
            refused = cli(*args)
            assert refused.returncode == 2, (args, refused)
            assert message in refused.stderr, (args, refused.stderr)
            assert "Traceback" not in refused.stderr
        assert program.terminate()[0] == 0


async def fails_odd_numbers(job: QueuedJob) -> None:
    if job.payload["n"] % 2:
        raise ValueError("odd")


async def test_rate_out_counts_the_jobs_done_per_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = MemoryQueue(max_attempts=1)
    sup = nd.Supervisor("sources")
    sup.add(nd.worker_pool(queue, fails_odd_numbers, workers=2), name="pool")
    with trio.fail_after(LIMIT):
        async with nd.open_supervisor(sup):
            await trio.sleep(5.0)
            for number in range(20):
                queue.put_nowait({"n": number})
            await trio.sleep(2.0)
            (source,) = sup.snapshot()["services"][0]["sources"]
    assert (source["done"], source["dead"]) == (10, 10)
    assert source["rate_in"] == pytest.approx(10.0)  # 20 jobs in 2 s
    assert source["rate_out"] == pytest.approx(5.0)  # 10 of them done in 2 s


async def test_metrics_show_each_sources_jobs_by_state_and_dead_letter_previews_are_escaped(
    nursery: trio.Nursery,
) -> None:
    queue = MemoryQueue(max_attempts=1)
    sup = nd.Supervisor("source-metrics")
    sup.add(nd.worker_pool(queue, fails_odd_numbers, workers=2), name="pool")
    hostile = "line\nforged\x1b[31m\u2028\r" + "x" * 200
    queue.put_many_nowait([{"n": 0}, {"n": 1, "note": hostile}, {"n": 2}])
    with trio.fail_after(LIMIT):
        await nursery.start(sup.serve)
        info = await nursery.start(partial(serve_dashboard, sup, "127.0.0.1:0", token=TOKEN))
        await wait_figures(sup, lambda source: (source["done"], source["dead"]) == (2, 1))
        async with httpx.AsyncClient(
            base_url=info.url, timeout=LIMIT, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            metrics = (await client.get("/metrics")).text
            listed = (await client.get("/api/services/pool/sources/0/dead")).json()
        await sup.drain()
        await sup.wait_finished()
    for state, count in (("queued", 0), ("leased", 0), ("done", 2), ("dead", 1)):
        line = (
            f'nursery_down_source_jobs{{app="source-metrics",service="pool",'
            f'source="MemoryQueue",state="{state}"}} {count}.0'
        )
        assert line in metrics.splitlines()
    (dead,) = listed["dead"]
    preview = dead["preview"]
    assert len(preview) == 120
    assert preview.startswith('{"n":1,"note":"line\\nforged\\u001b[31m')
    assert not any(ch in preview for ch in "\n\r\x1b\u2028")
