"""Chaos-test trio services: signal them mid-job, then prove nothing was lost.

- :class:`ChaosHarness` starts a target program, waits until it is ready, sends
  signals at random instants or at named moments (:meth:`Target.wait_in_flight`,
  :meth:`Target.wait_job_running`, :meth:`Target.wait_draining`) and stops it
  cleanly afterwards. The pytest fixture ``chaos`` gives one per test.
- :class:`RecordingSource` / :class:`HistoryRecorder` record every job's enqueue,
  start, completion, ack, release and dead-letter in a file the harness owns; an
  :class:`~nursery_down.queues.SQLiteQueue` records the same in its own file.
- :func:`check_history` reports lost, duplicated, unexpected and late-started jobs
  and the time each process took to exit after its signal.

The ``nursery-down chaos TARGET`` command runs all of this many times over.

:func:`throwaway_postgres` starts a PostgreSQL server for tests and demos of programs
that use :class:`~nursery_down.queues.PostgresQueue` (Debian's ``postgresql``
package, or the server ``$NURSERY_DOWN_TEST_POSTGRES`` names).
"""

from .._exceptions import NoPostgresError as NoPostgresError
from ._harness import DRAIN_LINE as DRAIN_LINE
from ._harness import READY_LINE as READY_LINE
from ._harness import ChaosHarness as ChaosHarness
from ._harness import Target as Target
from ._harness import TargetError as TargetError
from ._history import HISTORY_ENV as HISTORY_ENV
from ._history import JOB_EVENTS as JOB_EVENTS
from ._history import CheckReport as CheckReport
from ._history import Duplicate as Duplicate
from ._history import ExitTime as ExitTime
from ._history import History as History
from ._history import HistoryRecorder as HistoryRecorder
from ._history import JobEvent as JobEvent
from ._history import JobId as JobId
from ._history import LateStart as LateStart
from ._history import ProcessExit as ProcessExit
from ._history import RecordingSource as RecordingSource
from ._history import SignalSent as SignalSent
from ._history import check_history as check_history
from ._history import read_history as read_history
from ._postgres import DSN_ENV as POSTGRES_DSN_ENV
from ._postgres import PostgresServer as PostgresServer
from ._postgres import find_bindir as find_bindir
from ._postgres import remove_postgres as remove_postgres
from ._postgres import start_postgres as start_postgres
from ._postgres import throwaway_postgres as throwaway_postgres

__all__ = [
    "DRAIN_LINE",
    "HISTORY_ENV",
    "JOB_EVENTS",
    "POSTGRES_DSN_ENV",
    "READY_LINE",
    "ChaosHarness",
    "CheckReport",
    "Duplicate",
    "ExitTime",
    "History",
    "HistoryRecorder",
    "JobEvent",
    "JobId",
    "LateStart",
    "NoPostgresError",
    "PostgresServer",
    "ProcessExit",
    "RecordingSource",
    "SignalSent",
    "Target",
    "TargetError",
    "check_history",
    "find_bindir",
    "read_history",
    "remove_postgres",
    "start_postgres",
    "throwaway_postgres",
]
