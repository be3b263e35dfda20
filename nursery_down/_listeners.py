"""Named listening sockets that survive an upgrade: bound at first start, inherited after.

``nd.listener("http", ("0.0.0.0", 8000))`` returns a listening TCP socket. In the first
generation of a program it binds one (or adopts the one systemd's socket activation
passed, by its ``FileDescriptorName=``); in a generation started by an upgrade it adopts
the socket its predecessor passed under that name, so connections waiting in the queue
are never dropped and a port 0 socket keeps its port. Every socket made here is handed
to the next generation when the program upgrades.

Hand-over is by inheriting the descriptor, never by ``SO_REUSEPORT``: closing a
``SO_REUSEPORT`` socket drops the connections waiting in its queue.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
from collections.abc import Iterable

from ._exceptions import ConfigurationError

logger = logging.getLogger("nursery_down")

#: The environment variable naming the sockets an upgrade passes on: ``name=fd;...``.
LISTENERS_ENV = "NURSERY_DOWN_LISTENERS"
#: What a listener's name may hold: it travels in an environment variable.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: systemd passes activated sockets from this descriptor on.
_SD_LISTEN_FDS_START = 3


class _Registry:
    """The listening sockets of this process, by name; read the inherited ones once."""

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}
        self._inherited: dict[str, int] | None = None

    def inherited(self) -> dict[str, int]:
        """The descriptors passed to this process, by name (read once, then forgotten
        by the environment so that children of ours do not see them)."""
        if self._inherited is None:
            self._inherited = _read_inherited()
        return self._inherited

    def listener(
        self,
        name: str,
        address: tuple[str, int] | str,
        *,
        backlog: int,
        options: Iterable[tuple[int, int, int]],
    ) -> socket.socket:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"a listener's name is 1 to 64 letters, digits, '_', '.' or '-', got {name!r}"
            )
        host, port = _split(address)
        existing = self.sockets.get(name)
        if existing is not None and existing.fileno() >= 0:
            if port not in (0, existing.getsockname()[1]):
                raise ConfigurationError(
                    f"listener {name!r} already listens on {_where(existing)}; "
                    "give the other socket another name"
                )
            return existing
        fd = self.inherited().pop(name, None)
        if fd is not None:
            sock = _adopt(name, fd)
            logger.info("listener %s: inherited %s", name, _where(sock))
        else:
            sock = _bind(name, host, port, backlog, options)
            logger.info("listener %s: listening on %s", name, _where(sock))
        # Non-blocking, always: the generations share the socket's open file, and with it
        # O_NONBLOCK; a blocking socket object (or a dup() of one) would clear it and
        # make the other generation's event loop block in accept().
        sock.setblocking(False)
        self.sockets[name] = sock
        return sock

    def close_unclaimed(self) -> list[str]:
        """Close the inherited descriptors nobody asked for; return their names."""
        names = list(self.inherited())
        for fd in self.inherited().values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.inherited().clear()
        return names

    def descriptors(self) -> dict[str, int]:
        """Every listener's descriptor, by name: what an upgrade passes on."""
        return {name: sock.fileno() for name, sock in self.sockets.items() if sock.fileno() >= 0}


_registry = _Registry()


def listener(
    name: str,
    address: tuple[str, int] | str,
    *,
    backlog: int = 128,
    options: Iterable[tuple[int, int, int]] = (),
) -> socket.socket:
    """A listening TCP socket named *name*, inherited across an upgrade, bound otherwise.

    *address* is ``(host, port)`` or ``"host:port"`` (port 0: any free port, kept across
    upgrades). *options* are ``(level, option, value)`` for ``setsockopt`` on a newly
    bound socket (an inherited one has them already). Asking again for the same name
    returns the same socket until it is closed. The socket is non-blocking (keep it
    so: the generations share its O_NONBLOCK flag). The socket
    belongs to nursery_down (it is passed on at an upgrade): hand servers a duplicate,
    e.g. hypercorn's ``config.bind = [f"fd://{os.dup(sock.fileno())}"]`` or
    ``trio.socket.from_stdlib_socket(sock.dup())`` for ``trio.serve_listeners``.

    Raises :class:`ConfigurationError` for a bad name or address, or when the address
    cannot be bound (in use, not allowed), with what to do.
    """
    return _registry.listener(name, address, backlog=backlog, options=options)


def close_unclaimed_listeners() -> list[str]:
    """Close the inherited sockets no :func:`listener` call claimed; return their names."""
    return _registry.close_unclaimed()


def listener_descriptors() -> dict[str, int]:
    """Every listener of this process: name -> descriptor (what an upgrade passes on)."""
    return _registry.descriptors()


def encode_listeners(descriptors: dict[str, int]) -> str:
    """The value of :data:`LISTENERS_ENV` for *descriptors*."""
    return ";".join(f"{name}={fd}" for name, fd in sorted(descriptors.items()))


def _read_inherited() -> dict[str, int]:
    found: dict[str, int] = {}
    text = os.environ.pop(LISTENERS_ENV, "")
    for part in filter(None, text.split(";")):
        name, _, fd = part.partition("=")
        if _NAME.fullmatch(name) and fd.isdigit():
            found[name] = int(fd)
        else:
            logger.warning("ignoring %s entry %r: expected name=fd", LISTENERS_ENV, part[:80])
    if not found:
        found = _read_systemd()
    return found


def _read_systemd() -> dict[str, int]:
    """Sockets from systemd's socket activation, honoured only at first start."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    labels = names.split(":") if names else []
    found = {}
    for index in range(int(count)):
        label = labels[index] if index < len(labels) and labels[index] else f"fd{index}"
        found[label] = _SD_LISTEN_FDS_START + index
    return found


def _split(address: tuple[str, int] | str) -> tuple[str, int]:
    if isinstance(address, str):
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ConfigurationError(
                f"a listener's address is 'HOST:PORT' or (host, port), got {address!r}"
            )
        host = host.removeprefix("[").removesuffix("]")
        port = int(port_text)
    elif (
        isinstance(address, tuple)
        and len(address) == 2
        and isinstance(address[0], str)
        and isinstance(address[1], int)
        and not isinstance(address[1], bool)
    ):
        host, port = address
    else:
        raise ConfigurationError(
            f"a listener's address is 'HOST:PORT' or (host, port), got {address!r}"
        )
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"a port is 0 to 65535, got {port}")
    return host, port


def _adopt(name: str, fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigurationError(
            f"listener {name!r}: descriptor {fd} passed by the previous generation is "
            f"not a socket ({exc.strerror}); start the program afresh"
        ) from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ConfigurationError(
            f"listener {name!r}: descriptor {fd} is not a listening TCP socket; "
            "start the program afresh"
        )
    sock.set_inheritable(False)
    return sock


def _bind(
    name: str, host: str, port: int, backlog: int, options: Iterable[tuple[int, int, int]]
) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"listener {name!r}: cannot resolve {host!r} ({exc.strerror})"
        ) from None
    family, kind, protocol, _, where = infos[0]
    sock = socket.socket(family, kind, protocol)
    shown = f"[{where[0]}]:{port}" if family == socket.AF_INET6 else f"{where[0]}:{port}"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for level, option, value in options:
            sock.setsockopt(level, option, value)
        sock.bind(where)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = (
                "the port is already in use; stop the other program, choose another "
                "port, or use port 0 for any free one"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "this machine has no such address; use 127.0.0.1 or one of its own"
        else:
            why = str(exc.strerror or exc)
        raise ConfigurationError(f"{name}: cannot listen on {shown}: {why}") from None
    return sock


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
