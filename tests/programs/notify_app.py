"""``nd.run`` under a service manager: ``python tests/programs/notify_app.py``.

With ``NOTIFY_APP=off`` it runs ``nd.run(sup, notify=False)``; otherwise
``nd.run(sup)``, whose default is to notify. One service, ready at once, runs one
short job and waits for the drain.
"""

from __future__ import annotations

import os

import nursery_down as nd

sup = nd.Supervisor("notify-app", grace=5.0)


@sup.service
async def idle(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    async with ctx.job("first"):
        pass
    await ctx.wait_draining()


if __name__ == "__main__":
    if os.environ.get("NOTIFY_APP") == "off":
        raise SystemExit(nd.run(sup, notify=False))
    raise SystemExit(nd.run(sup))
