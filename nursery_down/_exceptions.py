"""The exceptions nursery_down raises.

Every error a user can see derives from :class:`NurseryDownError`, so one
``except nd.NurseryDownError`` catches them all::

    NurseryDownError
    ├── ConfigurationError          bad arguments or service definitions (exit code 2)
    │   └── DependencyCycleError    ``after=`` dependencies that form a cycle
    ├── UnknownServiceError         a control call named a service that does not exist
    ├── UnknownSourceError          a service has no job source of that number
    ├── UnknownJobError             no job of that key is in flight in the service
    ├── InvalidTransitionError      an action that the service's current state does not allow
    ├── DrainingError               a job was entered after its service began draining
    ├── UpgradeError                the new generation of an upgrade did not become ready
    ├── LockLostError               a PostgresLock could not be renewed in time
    ├── NoPostgresError             no PostgreSQL server for tests or demos can be had here
    ├── FleetError                  the fleet's database refused what was asked
    │   ├── FleetUnavailableError   the fleet's database cannot be reached
    │   └── UnknownProcessError     a fleet action named a process the fleet does not list
    └── QueueError                  a job source cannot do what was asked
        ├── QueueCorruptError       the queue file is not a queue database, or is damaged
        ├── QueueLockedError        another process holds the queue file's lock too long
        ├── QueueUnwritableError    the queue file cannot be created or written
        ├── PayloadError            a payload cannot be stored (not JSON-able); also a TypeError
        ├── NotLeasedError          ack/release/fail of a job this queue does not hold
        ├── QueueUnavailableError   the queue's database server cannot be reached
        └── QueueSchemaError        the queue's tables have a layout this version cannot read

Each message says what happened and what to do about it.
"""

from __future__ import annotations


class NurseryDownError(Exception):
    """Base class of every error raised by nursery_down."""


class ConfigurationError(NurseryDownError):
    """A supervisor, service or command was configured wrongly; the message says what to fix."""


class DependencyCycleError(ConfigurationError):
    """The ``after=`` dependencies of some services form a cycle, so no start order exists."""


class UnknownServiceError(NurseryDownError, LookupError):
    """A control method or route named a service that the supervisor does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        choices = ", ".join(repr(k) for k in known) or "none registered"
        super().__init__(f"unknown service {name!r}; known services: {choices}")


class UnknownSourceError(NurseryDownError, LookupError):
    """A service has no job source of that number (they are numbered from 0, as the
    snapshot's ``sources`` lists them)."""

    def __init__(self, service: str, index: object, count: int) -> None:
        self.service = service
        self.index = index
        have = f"0 to {count - 1}" if count else "none"
        super().__init__(
            f"service {service!r} has no job source #{index!r} (it has {have}); the "
            "snapshot's sources list them"
        )


class UnknownJobError(NurseryDownError, LookupError):
    """No job of that key is in flight in the service (it may just have ended)."""

    def __init__(self, service: str, key: str) -> None:
        self.service = service
        self.key = key
        super().__init__(
            f"service {service!r} has no job {key!r} in flight; it may have ended: the "
            "snapshot lists the jobs in flight"
        )


class InvalidTransitionError(NurseryDownError):
    """The requested action is not allowed from the service's current state."""


class DrainingError(NurseryDownError):
    """A job was entered after its service began draining.

    Take work through ``ctx.intake()``: it stops handing out items the moment a
    drain begins, so a job can never start late.
    """


class UpgradeError(NurseryDownError):
    """The new generation of an upgrade exited, or was not ready in time, and was killed.

    The running generation keeps serving; the message says what the new one did. Read
    its output (it shares this program's stdout and stderr) and try again.
    """


class QueueError(NurseryDownError):
    """A job source could not do what was asked; the message says what to do."""


class QueueCorruptError(QueueError):
    """The queue file is not a queue database, or is damaged.

    Nothing is read from it: move it aside (keep it for recovery) and restore a
    backup, or point the queue at another path.
    """


class QueueLockedError(QueueError):
    """Another process held the queue file's write lock for longer than the busy timeout.

    Find the process holding it (``fuser PATH``) and end its transaction, or give the
    queue a longer ``busy_timeout``.
    """


class QueueUnwritableError(QueueError):
    """The queue file or its folder cannot be created or written.

    Check that the folder exists and that this user may write both the file and the
    folder (SQLite writes a ``-wal`` and a ``-shm`` file next to it).
    """


class PayloadError(QueueError, TypeError):
    """A payload cannot be stored: a durable queue stores JSON (dict, list, str, int, float,
    bool, None)."""


class NotLeasedError(QueueError, LookupError):
    """``ack``/``release``/``fail`` named a job that this queue does not hold as claimed.

    Each claimed job is settled exactly once, by the queue that handed it out.
    """


class QueueUnavailableError(QueueError):
    """The queue's database server cannot be reached, or dropped the connection mid-call.

    Check that the server runs and accepts connections from this host, and that the
    connection string's host, port, database, user and password are right.
    """


class QueueSchemaError(QueueError):
    """The queue's tables have a layout this version of nursery_down cannot read.

    A newer layout was written by a newer nursery_down: upgrade this one to the
    version the rest of the fleet runs. Tables that nursery_down did not write are
    never touched: give the queue another name.
    """


class FleetError(NurseryDownError):
    """The fleet's database refused what was asked; the message says what and where."""


class FleetUnavailableError(FleetError):
    """The fleet's database cannot be reached.

    The process keeps running and reports again once the database answers; check
    that PostgreSQL runs at the fleet's address and accepts connections from this host.
    """


class UnknownProcessError(FleetError, LookupError):
    """A fleet action named a process id that the fleet does not list.

    Processes are listed by ``nursery-down fleet`` and ``GET /api/fleet``; a process
    that ended more than an hour ago is no longer listed.
    """

    def __init__(self, process_id: str) -> None:
        self.process_id = process_id
        shown = process_id if len(process_id) <= 40 else process_id[:40] + "..."
        super().__init__(f"no process {shown!r} in the fleet; list them with 'nursery-down fleet'")


class LockLostError(NurseryDownError):
    """A :class:`~nursery_down.queues.PostgresLock` could not be renewed before its
    lease could expire, so its block was cancelled: another process may hold it now.

    Check the connection to the database; the block may run again once the lock is
    held again.
    """


class NoPostgresError(NurseryDownError):
    """No PostgreSQL server can be had here for tests or a demo; the message says why.

    Install Debian's ``postgresql`` package (a throwaway cluster is then started from
    its binaries), or set ``NURSERY_DOWN_TEST_POSTGRES`` to a server's DSN.
    """


def describe_error(error: BaseException | str) -> str:
    """``"ExceptionType: message"`` for an exception; a string unchanged.

    An exception group is described by its first leaf, and how many more it holds:
    its own message ("Exceptions from Trio nursery (2 sub-exceptions)") says nothing.
    """
    if isinstance(error, BaseExceptionGroup):
        leaves = error_leaves(error)
        more = f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""
        return describe_error(leaves[0]) + more
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def error_leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in *error*, a group or not, groups within groups flattened."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in error_leaves(inner)]
    return [error]
