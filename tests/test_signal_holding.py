"""Signals outside the receiver's life are held: replayed before it opens, ignored after."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.subprocess

PROGRAM = textwrap.dedent(
    """
    import os, signal
    import nursery_down as nd
    from nursery_down._signals import holding_signals

    sup = nd.Supervisor("held")

    @sup.service
    async def idle(ctx):
        ctx.ready()
        await ctx.wait_draining()

    with holding_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # before any receiver: held
        code = nd.run(sup)                    # the held SIGTERM drains it at once
        os.kill(os.getpid(), signal.SIGTERM)  # after the receiver closed: ignored
        os.kill(os.getpid(), signal.SIGINT)
    print("exit code", code, flush=True)
    """
)


def test_early_signals_are_replayed_and_late_ones_ignored() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "exit code 0" in result.stdout
    assert "received SIGTERM" in result.stderr
    assert "Traceback" not in result.stderr
    assert "KeyboardInterrupt" not in result.stderr
