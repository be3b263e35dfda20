"""Shared fixtures for the nursery_down test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.postgres_server import NoServerError, Server, remove, start_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """A PostgreSQL server for the session (see tests/postgres_server.py).

    Skips the test when none can be had, but fails under ``CI``, which must never skip.
    """
    try:
        server = start_server()
    except NoServerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no PostgreSQL server under CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        remove(server)


@pytest.fixture
def postgres_dsn(postgres_server: Server) -> str:
    """The DSN of a new, empty database on the session's server."""
    return postgres_server.create_database()
