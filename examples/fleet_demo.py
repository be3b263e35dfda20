"""``make demo-fleet``: two worker processes on one PostgreSQL queue, one fleet page.

Starts a throwaway PostgreSQL cluster (Debian's ``postgresql`` package; as root its
commands run as the ``postgres`` user) unless FLEET_DSN names a database, then two
``nursery-down run examples/fleet_worker.py:sup`` processes with their dashboards on
127.0.0.1:8080 and 127.0.0.1:8081 (the first also produces jobs), and prints the
address that signs a browser in and the fleet page. Drain either worker from the
other's fleet page: its jobs finish and the other keeps working.

Ctrl-C drains both workers, then removes the throwaway cluster.

    make demo-fleet
    FLEET_DSN=postgresql://app@db/app python examples/fleet_demo.py

Settings (environment): FLEET_DSN, FLEET_DEMO_PORTS (default "8080,8081"),
NURSERY_DOWN_TOKEN (default: a new random token), and those of fleet_worker.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from nursery_down.testing import NoPostgresError, throwaway_postgres

WORKER = str(Path(__file__).resolve().parent / "fleet_worker.py") + ":sup"
URL_LINE = re.compile(r"nursery_down dashboard: (http://\S+?)/")


@contextlib.contextmanager
def database() -> Iterator[str]:
    """FLEET_DSN, or a throwaway cluster's new database for as long as the demo runs."""
    given = os.environ.get("FLEET_DSN", "").strip()
    if given:
        yield given
        return
    print("fleet demo: starting a throwaway PostgreSQL cluster...", file=sys.stderr, flush=True)
    with throwaway_postgres() as server:
        print(
            f"fleet demo: PostgreSQL in {server.data.parent if server.data else '?'} "
            "(removed at the end)",
            file=sys.stderr,
            flush=True,
        )
        yield server.create_database()


def forward(stream: object, urls: list[str], seen: threading.Event) -> None:
    """Copy a worker's output to ours, noting its dashboard's address."""
    assert hasattr(stream, "readline")
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        sys.stderr.flush()
        match = URL_LINE.search(line)
        if match:
            urls.append(match.group(1))
            seen.set()


def main() -> int:
    ports = os.environ.get("FLEET_DEMO_PORTS", "8080,8081").split(",")
    token = os.environ.get("NURSERY_DOWN_TOKEN") or secrets.token_urlsafe(24)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with database() as dsn:
            urls: list[str] = []
            try:
                for index, port in enumerate(ports):
                    env = {**os.environ, "FLEET_DSN": dsn, "NURSERY_DOWN_TOKEN": token}
                    if index == 0:
                        env["FLEET_PRODUCE"] = "1"
                    process = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "nursery_down",
                            "run",
                            WORKER,
                            "--dashboard",
                            f"127.0.0.1:{port.strip()}",
                        ],
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                    workers.append(process)
                    seen = threading.Event()
                    threading.Thread(
                        target=forward, args=(process.stdout, urls, seen), daemon=True
                    ).start()
                    while not seen.wait(0.1):
                        if process.poll() is not None:
                            print(
                                f"fleet demo: worker {index + 1} exited with code "
                                f"{process.returncode}",
                                file=sys.stderr,
                                flush=True,
                            )
                            return 1
                print(
                    f"fleet demo: sign in at {urls[0]}/?token={token} then open the fleet "
                    f"page, {urls[0]}/fleet (the other worker: {', '.join(urls[1:])}); "
                    "Ctrl-C drains both",
                    file=sys.stderr,
                    flush=True,
                )
                for process in workers:
                    process.wait()
            except KeyboardInterrupt:
                # The terminal sent SIGINT to the workers too: they drain. Wait for them.
                for process in workers:
                    process.wait()
            finally:
                for process in workers:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                        process.wait()
    except NoPostgresError as exc:
        print(f"fleet demo: {exc}; or set FLEET_DSN to a database", file=sys.stderr)
        return 2
    codes = [process.returncode for process in workers]
    print(f"fleet demo: both workers stopped (exit codes {codes})", file=sys.stderr, flush=True)
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
