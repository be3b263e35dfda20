"""Where tasks wait: a task's chain of awaits, and the whole task tree, bounded."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down._tasks import TASKS_KEPT, await_chain, task_tree


async def hold_the_lock(secret: str, ready: trio.Event) -> None:
    ready.set()
    await trio.sleep_forever()


async def test_a_chain_names_each_frame_but_never_a_local_value() -> None:
    ready = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_lock, "hunter2-password", ready, name="holder")
            await ready.wait()
            [holder] = [t for t in nursery.child_tasks if t.name == "holder"]
            frames = await_chain(holder)
            tree = task_tree()
            nursery.cancel_scope.cancel()
    assert [f["function"] for f in frames][:2] == ["hold_the_lock", "sleep_forever"]
    assert all(set(frame) == {"function", "file", "line"} for frame in frames)
    assert "hunter2" not in repr(frames)
    assert "hunter2" not in tree
    assert "task holder\n" in tree
    assert "hold_the_lock at " in tree


async def test_the_task_tree_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(TASKS_KEPT + 10):
                nursery.start_soon(trio.sleep_forever)
            await trio.testing.wait_all_tasks_blocked()
            tree = task_tree()
            nursery.cancel_scope.cancel()
    assert tree.count("\n    sleep_forever at ") < TASKS_KEPT
    assert tree.rstrip().splitlines()[-1].startswith("... and ")


async def test_job_stack_of_an_unknown_job_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = nd.Supervisor("app")

    @sup.service
    async def idle(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(5):
        async with nd.open_supervisor(sup):
            with pytest.raises(nd.UnknownJobError, match=r"^service 'idle' has no job 'nope' in"):
                sup.job_stack("idle", "nope")


async def test_a_worker_pool_job_shows_where_its_handler_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from nursery_down.queues import MemoryQueue

    queue = MemoryQueue()
    started = trio.Event()

    async def call_the_payment_provider() -> None:
        started.set()
        await trio.sleep_forever()

    async def handle(job: object) -> None:
        await call_the_payment_provider()

    sup = nd.Supervisor("app", grace=1.0)
    sup.add(nd.worker_pool(queue, handle, workers=3), name="pool")
    await queue.put("pay-1")
    with trio.fail_after(10):
        async with nd.open_supervisor(sup):
            await started.wait()
            [job] = sup.snapshot()["services"][0]["jobs"]
            stack = sup.job_stack("pool", str(job["key"]))
    functions = [frame["function"].rsplit(".", 1)[-1] for frame in stack["frames"]]
    assert functions[0] == "_work"  # the pool's worker
    assert functions.index("handle") < functions.index("call_the_payment_provider")
    assert stack["task"] == "pool worker"


async def test_the_task_tree_lists_2000_tasks_and_counts_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def every_task() -> int:
        count = 0
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            assert task is not None
            count += 1
            stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
        return count

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(2050):
                nursery.start_soon(trio.sleep_forever)
            await trio.testing.wait_all_tasks_blocked()
            tree = task_tree()
            total = every_task()
            nursery.cancel_scope.cancel()
    listed = [line for line in tree.splitlines() if line.lstrip().startswith("task ")]
    assert len(listed) == 2000
    assert tree.rstrip().splitlines()[-1] == f"... and {total - 2000} more tasks"
    assert total - 2000 >= 50
