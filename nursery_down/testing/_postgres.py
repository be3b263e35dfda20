"""A PostgreSQL server for tests, demos and benchmarks: the one ``NURSERY_DOWN_TEST_POSTGRES``
names, or a throwaway cluster started from the Debian packages' binaries.

A throwaway cluster lives in a temporary folder, listens on 127.0.0.1 and a Unix
socket of its own, and is stopped and deleted at the end of the session. ``initdb``
refuses to run as root, so as root every server command runs as the ``postgres``
user (``runuser -u postgres --``), which owns the folder.

Where no server can be had, :class:`~nursery_down.NoPostgresError` says why (this
project's own tests skip with that reason, except under ``CI``, where they fail).

::

    with throwaway_postgres() as server:
        dsn = server.create_database()
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .._exceptions import NoPostgresError
from .._postgresql import describe_dsn, first_line

#: A DSN of a server to use instead of a throwaway cluster (it must allow CREATE DATABASE).
DSN_ENV = "NURSERY_DOWN_TEST_POSTGRES"


@dataclass
class PostgresServer:
    """A running server: a DSN for its maintenance database, and control if we own it."""

    dsn: str
    #: The cluster's folder and binaries when this session started it, else None.
    data: Path | None = None
    bindir: Path | None = None
    log: Path | None = None
    port: int = 0
    socket_dir: Path | None = None
    #: fsync off is fine for functional tests; benchmarks that report figures turn it on.
    fsync: bool = False
    _as_postgres: list[str] = field(default_factory=list)

    @property
    def owned(self) -> bool:
        return self.data is not None

    def dsn_for(self, dbname: str) -> str:
        """A DSN of database *dbname* on this server."""
        import psycopg.conninfo

        return psycopg.conninfo.make_conninfo(self.dsn, dbname=dbname)

    def create_database(self) -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"nd_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.dsn_for(name)

    def restart(self, mode: str = "fast") -> None:
        """Restart the server: "fast" ends the sessions and writes everything first;
        "immediate" stops it as a crash would (it recovers from its log at the start)."""
        self._pg_ctl("restart", "-m", mode)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server: at once, as a crash would (it recovers at the next start), or
        with *mode* ``"fast"``, cleanly (sessions are ended, everything is written)."""
        if self.owned:
            self._pg_ctl("stop", "-m", mode)

    def start(self) -> None:
        """Start a server stopped with :meth:`stop` again."""
        self._pg_ctl("start")

    def dsn_reachable(self) -> bool:
        """True if the server accepts connections now."""
        import psycopg

        try:
            psycopg.connect(self.dsn, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def _pg_ctl(self, action: str, *args: str) -> None:
        if not self.owned:
            raise NoPostgresError(f"cannot {action} a server this session did not start")
        assert self.data is not None
        assert self.bindir is not None
        assert self.log is not None
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses=127.0.0.1"
            f" -c fsync={'on' if self.fsync else 'off'}"
        )
        command = [
            *self._as_postgres,
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            action,
            *args,
        ]
        if action in ("start", "restart"):
            command += ["-o", options]
        result = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
        if result.returncode:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise NoPostgresError(
                f"pg_ctl {action} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_postgres(*, fsync: bool = False) -> PostgresServer:
    """The server of :data:`DSN_ENV`, or a throwaway cluster; :class:`NoPostgresError` if none.

    *fsync* sets the throwaway cluster's ``fsync`` (off: fast, for functional tests).
    """
    try:
        import psycopg
    except ImportError:
        raise NoPostgresError(
            "psycopg is not installed: pip install 'nursery-down[postgres]'"
        ) from None
    dsn = os.environ.get(DSN_ENV, "").strip()
    if dsn:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
        except psycopg.Error as exc:
            raise NoPostgresError(
                f"${DSN_ENV} ({describe_dsn(dsn)}) cannot be reached: {first_line(exc, dsn)}"
            ) from None
        return PostgresServer(dsn)
    bindir = find_bindir()
    if bindir is None:
        raise NoPostgresError(
            "no PostgreSQL server: /usr/lib/postgresql/*/bin/initdb is missing (install "
            f"Debian's postgresql package) and ${DSN_ENV} is not set"
        )
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise NoPostgresError(
                "running as root, and runuser is missing to run initdb as postgres"
            )
        as_postgres = ["runuser", "-u", "postgres", "--"]
    top = Path(tempfile.mkdtemp(prefix="nd-postgres-"))
    data, sockets, log = top / "data", top / "sockets", top / "server.log"
    sockets.mkdir()
    if as_postgres:
        shutil.chown(top, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    os.chmod(top, 0o755)
    result = subprocess.run(
        [
            *as_postgres,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode:
        shutil.rmtree(top, ignore_errors=True)
        raise NoPostgresError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
    port = _free_port()
    server = PostgresServer(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
        data=data,
        bindir=bindir,
        log=log,
        port=port,
        socket_dir=sockets,
        fsync=fsync,
        _as_postgres=as_postgres,
    )
    try:
        server._pg_ctl("start")
    except NoPostgresError:
        shutil.rmtree(top, ignore_errors=True)
        raise
    return server


def remove_postgres(server: PostgresServer) -> None:
    """Stop a throwaway cluster and delete its folder."""
    if server.owned:
        assert server.data is not None
        try:
            server.stop()
        finally:
            shutil.rmtree(server.data.parent, ignore_errors=True)


@contextmanager
def throwaway_postgres(*, fsync: bool = False) -> Iterator[PostgresServer]:
    """A PostgreSQL server for the block (see :func:`start_postgres`), removed after it."""
    server = start_postgres(fsync=fsync)
    try:
        yield server
    finally:
        remove_postgres(server)
