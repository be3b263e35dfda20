"""A program that ends in the way ``ENDING_APP_MODE`` says, for the exit code tests.

Two services: ``store`` is ready at once and waits for the drain; ``ender`` is ready,
says so on stdout (``ender ready``), then, by ``ENDING_APP_MODE``:

- ``system-exit:N``: raises ``SystemExit(N)``
- ``keyboard-interrupt``: raises ``KeyboardInterrupt``
- ``fail``: raises ``RuntimeError``; it is ``temporary``, so that makes it FAILED while
  ``store`` keeps running

Run as ``python tests/programs/ending_app.py`` (``nd.run``) or through
``nursery-down run tests/programs/ending_app.py:sup``.
"""

from __future__ import annotations

import os

import nursery_down as nd

MODE = os.environ.get("ENDING_APP_MODE", "fail")

sup = nd.Supervisor("exits", grace=5.0)


@sup.service
async def store(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await ctx.wait_draining()


@sup.service(restart="temporary")
async def ender(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    print("ender ready", flush=True)  # noqa: T201
    if MODE.startswith("system-exit:"):
        raise SystemExit(int(MODE.removeprefix("system-exit:")))
    if MODE == "keyboard-interrupt":
        raise KeyboardInterrupt
    raise RuntimeError("ender gave up")


if __name__ == "__main__":
    raise SystemExit(nd.run(sup))
