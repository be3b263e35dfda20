"""serve_dashboard(): hypercorn in the supervisor's nursery, ending as soon as it stopped."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart_trio import QuartTrio

from nursery_down import ConfigurationError, Supervisor, listener

from ._address import USER_TIMEOUT_MS, format_host, resolve_address
from ._admission import admit_requests
from ._api import snapshot_answer
from ._app import SECURITY_HEADERS, create_app
from ._auth import MIN_TOKEN_LENGTH, allowed_host_headers
from ._context import dashboard_context

#: Seconds hypercorn gives unfinished requests once shutdown began.
GRACEFUL_TIMEOUT = 2.0
#: Seconds to wait for the event streams to finish before stopping the server anyway
#: (a stream stuck writing to a peer that stopped reading ends with its connection).
STREAMS_END_LIMIT = 0.5

server_logger = logging.getLogger("nursery_down.dashboard.server")


@dataclass(frozen=True, slots=True)
class DashboardInfo:
    """What :func:`serve_dashboard` passes to ``task_status.started()``.

    ``url`` is the base address (``"http://127.0.0.1:43365"``, no trailing slash) and
    ``token`` the operator token; :attr:`login_url` signs a browser in.
    """

    url: str
    token: str

    @property
    def login_url(self) -> str:
        """The address that signs a browser in: ``{url}/?token={token}``."""
        return f"{self.url}/?token={self.token}"

    def __repr__(self) -> str:
        return f"DashboardInfo(url={self.url!r}, token=<hidden>)"


async def serve_dashboard(
    supervisor: Supervisor,
    address: str,
    *,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    handed_over: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[DashboardInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard and HTTP API of *supervisor* on *address* until it stopped.

    *address* is ``"HOST:PORT"`` (port 0: any free port). The operator token is
    *token*, else ``$NURSERY_DOWN_TOKEN``, else a new random one. A host other than
    a loopback address is refused unless a token of 16 characters or more was given,
    since anyone who can reach the port could otherwise drain the services.
    *allowed_hosts* (default: ``$NURSERY_DOWN_ALLOWED_HOSTS``, comma-separated) adds
    names that the Host header may carry, e.g. when a reverse proxy serves the dashboard.

    Prints one line to stderr with the address to open (with ``?token=`` unless the
    token came from the caller or the environment) and passes a
    :class:`DashboardInfo` to ``task_status.started()``. Returns shortly after the
    supervisor stopped: it ends its own event streams first, then stops hypercorn.

    *handed_over*, when given, is awaited alongside: once it returns (a new generation
    of the program took over the dashboard's socket), this dashboard stops the same
    way, so that browsers reconnect to the new generation while this one drains.
    """
    where = await resolve_address(address)
    given = token or os.environ.get("NURSERY_DOWN_TOKEN") or None
    if not where.loopback and given is None:
        raise ConfigurationError(
            f"refusing to serve the dashboard on {address!r} without NURSERY_DOWN_TOKEN: "
            "anyone who can reach that address could drain the services; set "
            "NURSERY_DOWN_TOKEN to a long random secret (e.g. the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))') or bind 127.0.0.1"
        )
    if not where.loopback and given is not None and len(given.strip()) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"refusing to serve the dashboard on {address!r} with a token of "
            f"{len(given.strip())} characters: anyone who can reach that address could "
            f"guess it; use at least {MIN_TOKEN_LENGTH} (e.g. the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))') or bind 127.0.0.1"
        )
    operator_token = given or secrets.token_urlsafe(32)
    if allowed_hosts is None:
        allowed_hosts = os.environ.get("NURSERY_DOWN_ALLOWED_HOSTS", "").split(",")
    # A named listener: a new generation started by an upgrade inherits it, so the
    # browser's event stream reconnects to the new process on the same port.
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    # Accepted sockets inherit TCP_USER_TIMEOUT: a peer that stops reading is dropped
    # instead of holding shutdown.
    options = [] if user_timeout is None else [(socket.IPPROTO_TCP, user_timeout, USER_TIMEOUT_MS)]
    sock = listener("dashboard", (where.ip, where.port), options=options)
    try:
        where = replace(where, port=sock.getsockname()[1])
        app = create_app(
            supervisor,
            token=operator_token,
            allowed_hosts=allowed_host_headers(where, allowed_hosts),
        )
        url = f"http://{format_host(where.host)}:{where.port}"
        # hypercorn owns (and closes) the descriptor it is given: give it a duplicate.
        config = _config(f"fd://{os.dup(sock.fileno())}")
        shown = f"{url}/" if given else f"{url}/?token={operator_token}"
        await _serve_until_stopped(
            supervisor,
            app,
            config,
            shown,
            DashboardInfo(url=url, token=operator_token),
            handed_over,
            task_status,
        )
    finally:
        sock.close()  # a new generation started by an upgrade has its own copy


async def _serve_until_stopped(
    supervisor: Supervisor,
    app: QuartTrio,
    config: Config,
    shown: str,
    info: DashboardInfo,
    handed_over: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[DashboardInfo],
) -> None:
    streams = dashboard_context(app).streams
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(
                partial(
                    serve,
                    admit_requests(
                        shield_sends(app),
                        SECURITY_HEADERS,
                        direct=snapshot_answer(dashboard_context(app)),
                    ),
                    config,
                    shutdown_trigger=shutdown.wait,
                )
            )
        except* OSError as group:
            # It arrives nested several exception groups deep: report the first cause.
            cause: BaseException = group
            while isinstance(cause, BaseExceptionGroup):
                cause = cause.exceptions[0]
            raise ConfigurationError(f"cannot serve the dashboard on {info.url}: {cause}") from None
        # A plain line rather than a log record: log handlers must never see the token.
        print(f"nursery_down dashboard: {shown}", file=sys.stderr, flush=True)  # noqa: T201
        task_status.started(info)
        async with trio.open_nursery() as until:

            async def stop_after(wait: Callable[[], Awaitable[None]]) -> None:
                await wait()
                until.cancel_scope.cancel()

            until.start_soon(stop_after, supervisor.wait_finished)
            if handed_over is not None:
                until.start_soon(stop_after, handed_over)
        # Open event streams would hold hypercorn's shutdown for its whole graceful
        # timeout: end them first, then stop the server.
        streams.close()
        with trio.move_on_after(STREAMS_END_LIMIT):
            await streams.wait_all_ended()
        shutdown.set()


def _config(bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None  # request lines could carry ?token=
    if server_logger.level == logging.NOTSET:
        server_logger.setLevel(logging.WARNING)  # not hypercorn's "Running on ..." line
    config.errorlog = server_logger
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False
    return config


def shield_sends(app: ASGIFramework) -> ASGIFramework:
    """Wrap *app* so that each HTTP ``send()`` runs shielded from cancellation.

    quart-trio cancels its request nursery while hypercorn may still be inside
    ``send()``; hypercorn then never re-arms its keep-alive idle timer, and an idle
    keep-alive connection holds shutdown for the whole graceful timeout.
    """

    async def app_with_shielded_sends(
        scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def shielded_send(message: ASGISendEvent) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await app(scope, receive, shielded_send)

    return app_with_shielded_sends
