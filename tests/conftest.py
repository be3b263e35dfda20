"""Shared fixtures for the nursery_down test suite."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from typing import Any

import pytest

from nursery_down.testing import (
    NoPostgresError,
    PostgresServer,
    remove_postgres,
    start_postgres,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (nursery_down.testing.start_postgres).

    Skips the test when none can be had, but fails under ``CI``, which must never skip.
    """
    try:
        server = start_postgres()
    except NoPostgresError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no PostgreSQL server under CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        remove_postgres(server)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """The DSN of a new, empty database on the session's server."""
    return postgres_server.create_database()


#: prctl(2): orphaned descendants are reparented to us, not to PID 1.
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process a child subreaper for the test, as systemd is for a unit: a
    new generation started by an upgrade is orphaned when its parent exits, and then
    becomes our child, so the test can reap it and read its exit code."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.fail(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright's sync API (see PITFALLS: the
    test runs in its own thread; the dashboard runs in a subprocess)."""
    from playwright.sync_api import sync_playwright

    from tests.dashboard_helpers import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()
