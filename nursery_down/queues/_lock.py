"""PostgresLock: one holder at a time across machines, as a lease in PostgreSQL."""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from .._exceptions import ConfigurationError, LockLostError, QueueError, QueueUnavailableError
from .._postgresql import OneConnection, import_driver
from .._validate import require_seconds

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("nursery_down")

_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}\Z")

_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS nd_locks (
    name text PRIMARY KEY,
    holder text NOT NULL,
    token uuid NOT NULL,
    expires_at timestamptz NOT NULL)"""


class PostgresLock:
    """A lock that one process at a time holds, among processes on many machines.

    ::

        lock = PostgresLock("postgresql://app@db.internal/app", "stream-processor")
        async with lock.hold():
            ...  # only one process of the fleet runs this at a time

    The lock is a **lease** in the table ``nd_locks``: its holder renews it every
    ``lease / 3`` seconds. Leaving :meth:`hold` (a drain, an error) releases it at
    once, so a process waiting for it takes over within *poll_interval* seconds. A
    holder that dies (SIGKILL, a lost machine) stops renewing, and the lease expires
    *lease* seconds after its last renewal; all times are the database's.

    **Losing it.** A holder that cannot renew in time (cut off from the database,
    paused) must assume that another process now holds the lock: :meth:`hold`
    cancels its block at ``0.8 * lease`` seconds after the last renewal, before the
    lease can expire, and raises :class:`~nursery_down.LockLostError` once the block
    has ended. Keep work that must not be cut short inside ``ctx.job()``: the block's
    cancellation waits for it as a drain does, so give the lock a *lease* longer than
    such work's grace.

    It needs the ``postgres`` extra: ``pip install 'nursery-down[postgres]'``.
    """

    def __init__(
        self,
        dsn: str,
        name: str,
        *,
        lease: float = 10.0,
        poll_interval: float = 0.5,
        connect_timeout: float = 10.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError(
                "dsn must be a PostgreSQL connection string such as "
                f"'postgresql://user@host/dbname', got {dsn!r}"
            )
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                "a lock's name must be 1-100 letters, digits or '_.:-', got "
                f"{name if not isinstance(name, str) else name[:100]!r}"
            )
        self.lease = require_seconds("lease", lease, positive=True)
        self.poll_interval = require_seconds("poll_interval", poll_interval, positive=True)
        require_seconds("connect_timeout", connect_timeout, positive=True)
        if self.poll_interval >= self.lease:
            raise ConfigurationError(
                f"poll_interval ({poll_interval!r} s) must be shorter than lease ({lease!r} s)"
            )
        import_driver("PostgresLock")
        self.name = name
        #: Who holds it, as the table shows: ``host:pid``.
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._database = OneConnection(
            dsn,
            purpose="lock",
            unavailable=QueueUnavailableError,
            error=QueueError,
            connect_timeout=connect_timeout,
            prepare=_create_table,
        )
        self._token: uuid.UUID | None = None
        # True while a hold() waits for the lock: one hold at a time per object.
        self._waiting = False

    @property
    def held(self) -> bool:
        """True while this object holds the lock (inside :meth:`hold`)."""
        return self._token is not None

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[PostgresLock]:
        """Wait until the lock is free, hold it for the block, release it at the end.

        Raises :class:`~nursery_down.LockLostError` after the block if the lease
        could not be renewed in time (the block was cancelled then), and
        :class:`~nursery_down.queues.QueueUnavailableError` while waiting only if
        the database is away for longer than the connect timeout at every try.
        """
        if self._token is not None or self._waiting:
            raise ConfigurationError(
                f"lock {self.name!r} is already held, or waited for, by this object"
            )
        self._waiting = True
        token = uuid.uuid4()
        lost: str | None = None
        try:
            # Inside the try: a wait cancelled (or failed) still closes the connection,
            # and releases a lock its last try may have taken.
            try:
                await self._acquire(token)
            finally:
                self._waiting = False
            async with trio.open_nursery() as nursery:

                async def renew() -> None:
                    nonlocal lost
                    lost = await self._renew_forever(token)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(renew)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._token = None
            # Shielded: a block or a wait cancelled from outside still releases the
            # lock and closes the connection.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.poll_interval * 4):
                    try:
                        await self._database.call(_release_sync, self.name, token)
                    except QueueError as exc:
                        logger.warning(
                            "lock %s: cannot release it (%s); it expires %g s after its "
                            "last renewal",
                            self.name,
                            exc,
                            self.lease,
                        )
                await self._database.aclose()
        if lost is not None:
            raise LockLostError(
                f"lock {self.name!r} {lost}, so its block was cancelled: another process "
                "may hold it now"
            )

    async def _acquire(self, token: uuid.UUID) -> None:
        while True:
            try:
                if await self._database.call(
                    _acquire_sync, self.name, self.holder, token, self.lease
                ):
                    self._token = token
                    return
            except QueueUnavailableError as exc:
                logger.warning("lock %s: %s; trying again", self.name, exc)
            await trio.sleep(self.poll_interval)

    async def _renew_forever(self, token: uuid.UUID) -> str:
        """Renew every lease / 3 s until the lock is lost (taken over, or not renewed
        within 0.8 * lease s of the last renewal); return how it was lost."""
        renewed = trio.current_time()
        while True:
            await trio.sleep_until(min(renewed + self.lease / 3, renewed + 0.8 * self.lease))
            started = trio.current_time()
            with trio.move_on_at(renewed + 0.8 * self.lease):
                try:
                    still = await self._database.call(_renew_sync, self.name, token, self.lease)
                except QueueError as exc:
                    logger.warning("lock %s: cannot renew it (%s); trying again", self.name, exc)
                    await trio.sleep(self.poll_interval)
                    continue
                if not still:
                    logger.error("lock %s: the lease was taken over by another holder", self.name)
                    return "was taken over by another holder"
                renewed = started
                continue
            logger.error(
                "lock %s: not renewed within %g s: giving it up", self.name, 0.8 * self.lease
            )
            return f"could not be renewed within {0.8 * self.lease:g} s"


def _create_table(connection: psycopg.Connection[Any]) -> None:
    connection.execute(_SCHEMA)


def _acquire_sync(
    connection: psycopg.Connection[Any], name: str, holder: str, token: uuid.UUID, lease: float
) -> bool:
    row = connection.execute(
        """INSERT INTO nd_locks (name, holder, token, expires_at)
           VALUES (%s, %s, %s, now() + make_interval(secs => %s))
           ON CONFLICT (name) DO UPDATE SET
               holder = excluded.holder, token = excluded.token,
               expires_at = excluded.expires_at
           WHERE nd_locks.expires_at < now()
           RETURNING token""",
        (name, holder, token, lease),
    ).fetchone()
    return row is not None and row[0] == token


def _renew_sync(
    connection: psycopg.Connection[Any], name: str, token: uuid.UUID, lease: float
) -> bool:
    cursor = connection.execute(
        "UPDATE nd_locks SET expires_at = now() + make_interval(secs => %s)"
        " WHERE name = %s AND token = %s",
        (lease, name, token),
    )
    return cursor.rowcount == 1


def _release_sync(connection: psycopg.Connection[Any], name: str, token: uuid.UUID) -> None:
    connection.execute("DELETE FROM nd_locks WHERE name = %s AND token = %s", (name, token))
