"""A program whose interpreter takes a second to shut down after `nursery-down run` returned.

An atexit handler (it runs once the run is over) creates ``$SLOW_EXIT_MARKER`` and
sleeps, so a test can send signals while the process is exiting.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

import nursery_down as nd

sup = nd.Supervisor("slow-exit", grace=5.0)


@sup.service
async def idle(ctx: nd.ServiceContext) -> None:
    ctx.ready()
    await ctx.wait_draining()


def _exiting() -> None:
    Path(os.environ["SLOW_EXIT_MARKER"]).touch()
    time.sleep(1.0)


atexit.register(_exiting)
