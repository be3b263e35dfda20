"""Where the dashboard listens: parsing and resolving ``HOST:PORT``."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import trio

from nursery_down import ConfigurationError

#: Milliseconds that sent data may stay unacknowledged before the kernel drops the
#: connection. Accepted sockets inherit it from the listening socket; it is what frees
#: the server from a peer that stopped reading (its writes would otherwise wait forever,
#: even through a cancellation, and hold the process at shutdown).
USER_TIMEOUT_MS = 2000

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed ``HOST:PORT``: *host* as given (``localhost`` already mapped), *ip* resolved."""

    host: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.ip).is_loopback


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[V6]:PORT"``, ``":PORT"`` or ``"PORT"`` -> (host, port).

    An empty host means 127.0.0.1; port 0 means any free port.
    """
    text = address.strip() if isinstance(address, str) else ""
    if text.isdigit():
        host, port_text = "", text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise _bad(address)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise _bad(address)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise _bad(address)
    return host or "127.0.0.1", int(port_text)


async def resolve_address(address: str) -> Address:
    """Parse *address* and resolve its host to one IP address (the first the resolver gives)."""
    host, port = split_address(address)
    if host == "localhost":
        # Bind what browsers mean by it, not whichever family the resolver lists first.
        return Address(host=host, ip="127.0.0.1", port=port)
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve the dashboard on {address!r}: cannot resolve {host!r} ({exc}); "
                "use an IP address such as 127.0.0.1:8080"
            ) from None
        ip = str(infos[0][4][0])
    return Address(host=host, ip=ip, port=port)


def format_host(host: str) -> str:
    """*host* as it appears in a URL or Host header (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _bad(address: object) -> ConfigurationError:
    return ConfigurationError(
        f"bad dashboard address {address!r}: expected HOST:PORT such as 127.0.0.1:8080 "
        "(port 0 picks a free port; IPv6 as [::1]:8080)"
    )
