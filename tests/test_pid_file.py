"""The PID file: written at start, replaced atomically at an upgrade, removed at exit."""

from __future__ import annotations

import os
from pathlib import Path

import trio

import nursery_down as nd
from nursery_down._upgrade import remove_pid_file, write_pid_file


def test_a_pid_file_is_replaced_whole_and_removed_only_by_its_process(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    write_pid_file(str(path), os.getpid())
    assert path.read_text() == f"{os.getpid()}\n"
    write_pid_file(str(path), 1)  # an upgrade names the new generation
    assert path.read_text() == "1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["app.pid"]  # no temporary left
    remove_pid_file(str(path))  # not ours any more: left alone
    assert path.exists()
    write_pid_file(str(path), os.getpid())
    remove_pid_file(str(path))
    assert not path.exists()


async def test_open_supervisor_writes_the_pid_file_while_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "run.pid"
    sup = nd.Supervisor("pid-file")

    @sup.service
    async def idle(ctx: nd.ServiceContext) -> None:
        ctx.ready()
        await ctx.wait_draining()

    with trio.fail_after(10):
        async with nd.open_supervisor(sup, pid_file=str(path)):
            assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()
