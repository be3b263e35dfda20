"""nd.listener: named listening sockets, bound at first start, inherited after an upgrade."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import nursery_down as nd
from tests.polling import PATIENCE, wait_for

PROGRAM = Path(__file__).resolve().parent / "programs" / "upgrade_app.py"


def test_a_listener_is_bound_once_and_returned_again_by_name() -> None:
    sock = nd.listener("test-once", ("127.0.0.1", 0))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        port = sock.getsockname()[1]
        assert port != 0
        assert nd.listener("test-once", f"127.0.0.1:{port}") is sock
        assert nd.listener("test-once", ("127.0.0.1", 0)) is sock
        with pytest.raises(nd.ConfigurationError, match="already listens on"):
            nd.listener("test-once", ("127.0.0.1", port + 1 if port < 65535 else port - 1))
    finally:
        sock.close()
    # Closed: the name binds anew.
    again = nd.listener("test-once", ("127.0.0.1", 0))
    again.close()
    assert again is not sock


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "semi;colon", "eq=ual", 7])
def test_a_bad_name_is_a_configuration_error(name: object) -> None:
    with pytest.raises(nd.ConfigurationError, match="listener's name"):
        nd.listener(name, ("127.0.0.1", 0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.1:http", ("127.0.0.1",), ("127.0.0.1", "80"), 8080]
)
def test_a_bad_address_is_a_configuration_error(address: object) -> None:
    with pytest.raises(nd.ConfigurationError, match="HOST:PORT"):
        nd.listener("bad-address", address)  # type: ignore[arg-type]


def test_a_port_out_of_range_is_a_configuration_error() -> None:
    with pytest.raises(nd.ConfigurationError, match="0 to 65535"):
        nd.listener("big-port", ("127.0.0.1", 70000))


def test_a_taken_port_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(nd.ConfigurationError, match=f"127.0.0.1:{port}: the port is already"):
            nd.listener("taken", ("127.0.0.1", port))


def test_an_inherited_socket_is_adopted_and_unclaimed_ones_are_closed(tmp_path: Path) -> None:
    # What a new generation sees: NURSERY_DOWN_LISTENERS names descriptors it inherited.
    wanted = socket.create_server(("127.0.0.1", 0))
    unwanted = socket.create_server(("127.0.0.1", 0))
    code = (
        "import os, socket, sys\n"
        "import nursery_down as nd\n"
        "from nursery_down._listeners import close_unclaimed_listeners\n"
        "sock = nd.listener('http', ('127.0.0.1', 0))\n"
        "print(sock.getsockname()[1], sock.fileno() == int(sys.argv[1]))\n"
        "print(','.join(close_unclaimed_listeners()))\n"
        "print('NURSERY_DOWN_LISTENERS' in os.environ)\n"
        "try:\n"
        "    os.fstat(int(sys.argv[2]))\n"
        "    print('still open')\n"
        "except OSError:\n"
        "    print('closed')\n"
    )
    wanted_port = wanted.getsockname()[1]
    fds = (wanted.fileno(), unwanted.fileno())
    env = {**os.environ, "NURSERY_DOWN_LISTENERS": f"http={fds[0]};old={fds[1]}"}
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, fds)],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=True,
    )
    wanted.close()
    unwanted.close()
    adopted, unclaimed, still_set, state = result.stdout.split("\n")[:4]
    assert adopted.split() == [str(wanted_port), "True"]  # the very socket, not a new one
    assert unclaimed == "old"
    assert still_set == "False"  # children of the new generation do not see it
    assert state == "closed"


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="needs systemd-socket-activate (Debian package systemd)",
)
def test_systemd_socket_activation_is_honoured_at_first_start(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port for systemd-socket-activate to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "activated.log"
    env = {**os.environ, "UPGRADE_APP_PORT_FILE": str(tmp_path / "port")}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                f"127.0.0.1:{port}",
                "--fdname=http",
                sys.executable,
                str(PROGRAM),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:

        def answer() -> str | None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as client:
                    return client.makefile().readline()
            except ConnectionRefusedError:
                return None  # not listening yet

        line = wait_for(answer, what="an answer on the activated socket")
        assert line.split()[0] == str(process.pid)  # it exec'd itself: the same process
        assert "listener http: inherited" in log.read_text()
        process.terminate()
        assert process.wait(PATIENCE) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
