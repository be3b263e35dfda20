"""One PostgreSQL connection used from trio: calls in a worker thread, one at a time.

The fleet and :class:`~nursery_down.queues.PostgresLock` each keep one connection of
their own (sync psycopg 3: its async API runs on asyncio only). A call runs in a
worker thread and is abandoned if cancelled (the program is ending): the thread then
closes the connection itself rather than leaking it, and the next call makes a new
one. A broken connection is dropped and made again at the next call; psycopg's errors
become the caller's own error classes, with the server named but never its password.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import outcome
import trio

from ._exceptions import ConfigurationError, NurseryDownError

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

logger = logging.getLogger("nursery_down")

#: Longest text kept from elsewhere (a server's message, an actor) in ours.
TEXT_LIMIT = 200


def import_driver(what: str) -> None:
    """Import psycopg, or raise a ConfigurationError saying *what* needs it and how to
    install it."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"{what} needs psycopg 3 ({exc}); install it with pip install 'nursery-down[postgres]'"
        ) from None


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages (never its password)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "the given DSN"
    host = str(parts.get("host") or os.environ.get("PGHOST") or "localhost")
    port = str(parts.get("port") or os.environ.get("PGPORT") or "5432")
    dbname = str(parts.get("dbname") or os.environ.get("PGDATABASE") or "")
    where = f"{host}:{port}" if not host.startswith("/") else f"{host} (port {port})"
    # A password libpq read in part as the host (an "@" not percent-encoded) stays hidden.
    return hide_password(f"{where}/{dbname}" if dbname else where, dsn)


def first_line(exc: BaseException, dsn: str) -> str:
    """The first line of *exc*'s message, printable and without *dsn*'s password (a
    server's message goes to logs, and libpq quotes the parts of a DSN it cannot parse)."""
    lines = hide_password(str(exc), dsn).strip().splitlines()
    return printable(lines[0] if lines else type(exc).__name__)


# The user information of a URI DSN. A password with an "@" of its own that was not
# percent-encoded is read by libpq up to its first "@": both readings are hidden.
_URI_USERINFO = (
    re.compile(r"\s*postgres(?:ql)?://([^@]*)@", re.IGNORECASE),
    re.compile(r"\s*postgres(?:ql)?://(.*)@", re.IGNORECASE | re.DOTALL),
)
# A password as a URI query parameter, up to the next parameter.
_PASSWORD_PARAMETER = re.compile(r"[?&]password=([^&#]*)", re.IGNORECASE)
# A password as a keyword: quoted, or up to the next keyword (a password with a space
# that was not quoted is read by libpq as two words: both are hidden).
_PASSWORD_KEYWORD = re.compile(
    r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|.*?)(?=\s+[A-Za-z_]+\s*=|\s*$)",
    re.IGNORECASE | re.DOTALL,
)
# The words of a password a parser may have split apart and quoted alone.
_PIECES = re.compile(r"[\s@'\"\\=]+")


def hide_password(text: str, dsn: str) -> str:
    """*text* with every form of *dsn*'s password in it replaced by ``***``.

    Works on a DSN that does not parse too (its password is found by its place), as
    the messages about such a DSN are the ones that quote it: as written, unquoted,
    unescaped, percent-decoded, and each word of it that a parser may have split off.
    """
    found = []
    for pattern in _URI_USERINFO:
        userinfo = pattern.match(dsn)
        if userinfo is not None and ":" in userinfo.group(1):
            found.append(userinfo.group(1).split(":", 1)[1])
    found += _PASSWORD_PARAMETER.findall(dsn)
    for value in _PASSWORD_KEYWORD.findall(dsn):
        found.append(value)
        inner = value[1:-1] if value.startswith("'") and value.endswith("'") else value
        found.append(re.sub(r"\\(.)", r"\1", inner))
    secrets = {form for secret in found for form in (secret, urllib.parse.unquote(secret))}
    # Words of two characters or more: hiding every single letter would leave nothing.
    secrets |= {piece for secret in secrets for piece in _PIECES.split(secret) if len(piece) > 1}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
        else:  # short: only where it stands alone, or every "a" in a message would go
            alone = rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])"
            text = re.sub(alone, "***", text)
    return text


def printable(text: str) -> str:
    """*text* without control characters, cut to :data:`TEXT_LIMIT` characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= TEXT_LIMIT else clean[: TEXT_LIMIT - 1] + "…"


def close_quietly(connection: psycopg.Connection[Any] | None) -> None:
    """Close *connection* (None: nothing), whatever state it is in."""
    if connection is not None:
        try:
            connection.close()
        except Exception as exc:  # closing a broken connection: nothing left to do
            logger.debug("closing a PostgreSQL connection: %s", exc)


class OneConnection:
    """A connection to *dsn* for calls from trio, made again whenever it broke.

    *prepare* runs on each new connection (in its thread) before it is used, e.g. to
    create tables. Errors: a connection that cannot be made or broke raises
    *unavailable* (the message names the server and what to check); any other
    database error raises *error*.
    """

    def __init__(
        self,
        dsn: str,
        *,
        purpose: str,
        unavailable: type[NurseryDownError],
        error: type[NurseryDownError],
        connect_timeout: float,
        prepare: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self._purpose = purpose
        self._unavailable = unavailable
        self._error = error
        self._connect_timeout = max(1, math.ceil(connect_timeout))
        self._prepare = prepare
        self._connection: psycopg.Connection[Any] | None = None
        self._lock = trio.Lock()

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(connection, *args)`` in a worker thread, one call at a time."""
        async with self._lock:
            handoff = Handoff(self._connection)
            self._connection = None
            try:
                result = await trio.to_thread.run_sync(
                    self._run_sync, function, args, handoff, abandon_on_cancel=True
                )
            finally:
                self._connection = handoff.take()
        return result.unwrap()

    async def aclose(self) -> None:
        """Close the connection; a later call opens a new one."""
        async with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            await trio.to_thread.run_sync(close_quietly, connection)

    def connect_sync(self, *, application: str) -> psycopg.Connection[Any]:
        """A new autocommit connection (in a worker thread), or *unavailable*."""
        import psycopg

        try:
            return psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name=application,
            )
        except psycopg.Error as exc:
            raise self._unavailable(self._unreachable(exc)) from None

    def _unreachable(self, exc: BaseException) -> str:
        return (
            f"the {self._purpose} database at {self.where} cannot be reached "
            f"({first_line(exc, self.dsn)}); check that PostgreSQL runs there and that this host "
            "may connect"
        )

    def _run_sync(
        self, function: Callable[..., T], args: tuple[Any, ...], handoff: Handoff
    ) -> outcome.Outcome[T]:
        import psycopg

        result: outcome.Outcome[T]
        connection = handoff.start()
        try:
            if connection is None or connection.closed:
                connection = self.connect_sync(application=f"nursery_down {self._purpose}")
                if self._prepare is not None:
                    try:
                        self._prepare(connection)
                    except BaseException:
                        close_quietly(connection)
                        raise
        except Exception as failed:  # connecting or preparing failed (it says why)
            connection, result = None, outcome.Error(failed)
        else:
            result = outcome.capture(function, connection, *args)
        error = result.error if isinstance(result, outcome.Error) else None
        if isinstance(error, psycopg.Error):
            close_quietly(connection)
            connection = None
            if isinstance(error, psycopg.OperationalError):
                result = outcome.Error(self._unavailable(self._unreachable(error)))
            else:
                result = outcome.Error(
                    self._error(
                        f"the {self._purpose} database at {self.where}: "
                        f"{first_line(error, self.dsn)}"
                    )
                )
        handoff.give(connection)
        return result


class Handoff:
    """A connection passed to a worker thread and back to the trio task that started it.

    The task may stop waiting (cancelled: the program is ending) before the thread
    started, or before it finished. In the first case the connection stays the
    task's; in the second the thread closes it itself instead of leaking it.
    """

    def __init__(self, connection: psycopg.Connection[Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._connection = connection
        self._started = False
        self._given = False
        self._taken = False

    def start(self) -> psycopg.Connection[Any] | None:
        """In the thread, first: the connection to use (the thread owns it now)."""
        with self._lock:
            self._started = True
            connection, self._connection = self._connection, None
            return connection

    def give(self, connection: psycopg.Connection[Any] | None) -> None:
        """In the thread, last: hand over *connection*, or close it if nobody takes it."""
        with self._lock:
            self._given = True
            if not self._taken:
                self._connection = connection
                return
        close_quietly(connection)

    def take(self) -> psycopg.Connection[Any] | None:
        """In the task, once the thread returned or was abandoned: the connection to
        keep, or None (broken, or the thread still runs and will close it)."""
        with self._lock:
            self._taken = True
            connection, self._connection = self._connection, None
            return connection if self._given or not self._started else None
