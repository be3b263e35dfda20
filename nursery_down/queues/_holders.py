"""Who holds a lease on an SQLite queue: a process run, and whether it still runs.

A lease names its holder by pid and a token of that process's start, so a pid reused
later is not mistaken for it, and by an owner name (one queue object) that ends with
the holder's PID namespace. Processes of other PID namespaces (containers of one host
sharing the file) cannot see each other's pids: each holds a presence lock on a file
next to the queue's while it has the queue open, and that lock tells.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import sys
import threading
import uuid

if sys.platform.startswith("linux"):
    import fcntl


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return ""


def _linux_start_time(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a running process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # a zombie has finished running: its leases are orphans
        return None
    return fields[19].decode()


@functools.cache
def pid_namespace() -> str:
    """This process's PID namespace (an inode number), "" if it cannot be told."""
    if not sys.platform.startswith("linux"):
        return ""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def new_owner() -> str:
    """A new lease owner name: unique, and ending with this process's PID namespace.

    The namespace goes with the owner rather than the token, whose form earlier
    versions compare whole: a process of one of them sharing the file (the previous
    generation, during a deploy) would take every lease of this one for orphaned.
    """
    namespace = pid_namespace()
    return f"{uuid.uuid4().hex}@{namespace}" if namespace else uuid.uuid4().hex


def owner_namespace(owner: str | None) -> str | None:
    """The PID namespace an owner name ends with; None if it carries none."""
    if owner is None or "@" not in owner:
        return None
    return owner.rpartition("@")[2]


def process_token(pid: int) -> str | None:
    """A token naming one run of process *pid*, or None if it is not running.

    On Linux it holds the boot id and the process's start time, so a pid reused
    later (or after a reboot) gets a different token. Elsewhere it is the pid.
    """
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        start = _linux_start_time(pid)
        return None if start is None else f"linux:{_boot_id()}:{start}"
    return f"pid:{pid}" if _pid_exists(pid) else None


def process_alive(pid: int | None, token: str | None) -> bool:
    """True if the process run named by *pid* and *token* is still running (a
    process of this PID namespace)."""
    if pid is None or token is None:
        return False
    if token.startswith("linux:"):
        return process_token(pid) == token
    return _pid_exists(pid)


# A process that may hold leases holds a shared lock on one byte of a file next to
# the queue's, ``<path>-holders``, at an offset its token and namespace name, from
# its first open of the queue until it ends (the kernel drops the lock then, however
# it ended). Locks are seen across PID namespaces, pids are not. They are open file
# description locks: another descriptor of the file, opened and closed to look,
# leaves them alone.

#: (holders file, token@namespace) -> [descriptor holding the lock, queues open on it]
_PRESENCE: dict[tuple[str, str], list[int]] = {}
_PRESENCE_LOCK = threading.Lock()
_FLOCK = "hhqqi"  # struct flock: type, whence, start, length, pid


def _presence_offset(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=5).digest(), "big")


def _holders_file(path: str) -> str:
    """The presence file of the queue file *path*: ``<path>-holders``."""
    return os.path.realpath(path) + "-holders"


def _presence_key(path: str, token: str) -> tuple[str, str] | None:
    namespace = pid_namespace()
    if not namespace:
        return None
    return _holders_file(path), f"{token}@{namespace}"


def hold_presence(path: str, token: str) -> None:
    """Take the presence lock that tells processes of other PID namespaces that this
    one (*token*) runs, for one more queue open on the file *path*. Where it cannot
    be taken (a folder that cannot be written), they take this process to run."""
    key = _presence_key(path, token)
    if not sys.platform.startswith("linux") or key is None:
        return
    holders, name = key
    with _PRESENCE_LOCK:
        held = _PRESENCE.get(key)
        if held is not None:
            held[1] += 1
            return
        try:
            fd = os.open(holders, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            return
        lock = struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, _presence_offset(name), 1, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        except OSError:
            os.close(fd)
            return
        _PRESENCE[key] = [fd, 1]


def drop_presence(path: str, token: str) -> None:
    """One queue fewer open on *path*: with none left, the presence lock goes (a
    process that opens and closes many queue files keeps no descriptor of each)."""
    key = _presence_key(path, token)
    if key is None:
        return
    with _PRESENCE_LOCK:
        held = _PRESENCE.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _PRESENCE[key]
            os.close(held[0])


def present(path: str, token: str | None, namespace: str) -> bool:
    """Whether the process run named by *token* in PID namespace *namespace* holds
    its presence lock for the queue file *path*."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        fd = os.open(_holders_file(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # it could not take one either: never take its leases
    try:
        offset = _presence_offset(f"{token}@{namespace}")
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
    except OSError:
        return True
    finally:
        os.close(fd)
    kind: int = struct.unpack(_FLOCK, answer)[0]
    return kind != fcntl.F_UNLCK


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
