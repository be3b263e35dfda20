"""Job sources: where a worker pool takes its jobs from, and reports back to.

- :class:`JobSource`: the protocol (claim, ack, release, fail).
- :class:`MemoryQueue`: in-process, for tests and simple programs.
- :class:`SQLiteQueue`: durable in one SQLite file; survives any crash of the process.
- :class:`PostgresQueue`: durable in PostgreSQL, shared by worker processes on many
  machines (needs ``pip install 'nursery-down[postgres]'``; imported only when used).
- :class:`PostgresLock`: one holder at a time among those processes (a lease), e.g.
  for a stream processor that must run once in the fleet.

The errors they raise derive from :class:`QueueError` (itself a
``nursery_down.NurseryDownError``) and are importable from here too.
"""

from .._exceptions import NotLeasedError as NotLeasedError
from .._exceptions import PayloadError as PayloadError
from .._exceptions import QueueCorruptError as QueueCorruptError
from .._exceptions import QueueError as QueueError
from .._exceptions import QueueLockedError as QueueLockedError
from .._exceptions import QueueSchemaError as QueueSchemaError
from .._exceptions import QueueUnavailableError as QueueUnavailableError
from .._exceptions import QueueUnwritableError as QueueUnwritableError
from ._lock import PostgresLock as PostgresLock
from ._memory import MemoryQueue as MemoryQueue
from ._postgres import PostgresQueue as PostgresQueue
from ._source import DeadJob as DeadJob
from ._source import JobSource as JobSource
from ._source import QueuedJob as QueuedJob
from ._source import QueueStatistics as QueueStatistics
from ._sqlite import SQLiteQueue as SQLiteQueue

__all__ = [
    "DeadJob",
    "JobSource",
    "MemoryQueue",
    "NotLeasedError",
    "PayloadError",
    "PostgresLock",
    "PostgresQueue",
    "QueueCorruptError",
    "QueueError",
    "QueueLockedError",
    "QueueSchemaError",
    "QueueStatistics",
    "QueueUnavailableError",
    "QueueUnwritableError",
    "QueuedJob",
    "SQLiteQueue",
]
