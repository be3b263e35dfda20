"""One thread that owns an SQLite write connection and commits waiting writes together.

Trio tasks hand it operations without a thread hop (a put on a thread-safe queue),
park until their result is delivered, and are woken together, one wake-up of the
trio loop per transaction. Every operation waiting when a transaction starts goes
into it (group commit): twenty acks cost one commit, one ``fsync`` at
``synchronous=FULL``, and each caller resumes only once its own transaction is
durable.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from .._exceptions import QueueError

T = TypeVar("T")

#: At most this many operations share one transaction, so that none waits behind
#: an unbounded group.
MAX_GROUP = 256


class _Operation(Generic[T]):
    """An operation waiting for the writer: a function of the connection and its result."""

    __slots__ = ("args", "function", "idle", "peek", "result", "task")

    def __init__(
        self,
        function: Callable[..., T],
        args: tuple[Any, ...],
        peek: Callable[[sqlite3.Connection], bool] | None = None,
        idle: Any = None,
    ) -> None:
        self.function = function
        self.args = args
        self.peek = peek
        self.idle = idle
        self.task = trio.lowlevel.current_task()
        self.result: outcome.Outcome[T] | None = None


def _nothing() -> None:
    pass


class _Stop:
    """Sent last: the writer runs *final* on its connection, closes it and ends."""

    __slots__ = ("final",)

    def __init__(self, final: _Operation[Any]) -> None:
        self.final = final


class GroupWriter:
    """The write connection of one queue, owned by a thread of its own.

    :meth:`start` opens the connection in that thread (*connect* may raise: the
    error reaches the caller and no thread is left behind); :meth:`run` executes
    ``function(connection, *args)`` inside the next group transaction and returns
    its result or raises its error; :meth:`stop` runs a last function on the
    connection, closes it and ends the thread.

    Operations follow one rule, so that a group never needs a savepoint per member:
    an operation that refuses its input raises one of *refusals* before it writes
    anything, and the rest of its group commits as if it had not been there. Any
    other error (a full disk, a bug) rolls back the whole group, which then runs
    again one operation per transaction, so that each caller gets the outcome of its
    own operation alone. A transaction that cannot begin (the lock held beyond the
    busy timeout) ran nothing: every member gets that error at once.

    *translate* turns an :class:`sqlite3.Error` into the error a caller should see.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        translate: Callable[[sqlite3.Error], BaseException],
        refusals: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._name = name
        self._refusals = refusals
        self._connect = connect
        self._translate = translate
        self._inbox: queue.SimpleQueue[_Operation[Any] | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._connection: sqlite3.Connection | None = None
        self._stopped = False

    async def start(self) -> None:
        """Open the connection in a new writer thread; raise what opening raised."""
        self._token = trio.lowlevel.current_trio_token()
        opened = _Operation(self._open, ())
        self._thread = threading.Thread(
            target=self._serve,
            args=(opened,),
            name=f"nursery_down writer {self._name}",
            daemon=True,
        )
        self._thread.start()
        try:
            await self._wait(opened)
        except BaseException:
            # Opening failed and the thread is ending: joined (a matter of
            # microseconds), so that none is left behind once this raises.
            await trio.to_thread.run_sync(self._thread.join)
            raise

    async def run(
        self,
        function: Callable[..., T],
        *args: Any,
        peek: Callable[[sqlite3.Connection], bool] | None = None,
        idle: Any = None,
    ) -> T:
        """``function(connection, *args)`` in the next group transaction: its result,
        once that transaction committed.

        *peek*, when given, is asked first, outside any transaction, whether there
        is anything to do; in a group of such operations only, those with nothing
        to do return *idle* without running, and a group where none has anything
        to do takes no write lock (an idle claim's look never blocks a writer).

        Once handed over the operation always completes: a cancellation of the
        caller waits for it, as :func:`trio.to_thread.run_sync` does.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._stopped or self._thread is None:
            raise trio.ClosedResourceError("the queue's writer was stopped")
        self.check_run()
        operation = _Operation(function, args, peek, idle)
        self._inbox.put(operation)
        return await self._wait(operation)

    async def stop(self, final: Callable[[sqlite3.Connection], None]) -> None:
        """Run *final* on the connection after every operation handed over before,
        close the connection and end the thread. Idempotent."""
        if self._stopped or self._thread is None:
            await trio.lowlevel.checkpoint()
            return
        self.check_run(closing=True)
        self._stopped = True
        if not self._thread.is_alive():
            # It ended with the trio run it delivered to: the connection is closed,
            # and nothing would ever answer.
            await trio.lowlevel.checkpoint()
            return
        last = _Operation(final, ())
        self._inbox.put(_Stop(last))
        try:
            await self._wait(last)
        finally:
            thread = self._thread
            # The thread ends right after delivering: joining takes microseconds.
            await trio.to_thread.run_sync(thread.join)

    def check_run(self, *, closing: bool = False) -> None:
        """Raise :class:`QueueError` unless the calling trio run opened this writer.

        The writer wakes its callers through the trio run that opened it: a task of
        another run would never be woken (or be woken inside the wrong run). With
        *closing*, a writer whose run has ended passes to the calling run, so that
        it can be stopped: no task of the ended run waits on it any more.
        """
        token = trio.lowlevel.current_trio_token()
        if token is self._token:
            return
        if not self._run_ended():
            raise QueueError(
                "this queue is open in another trio.run(), which is still running; "
                "close it there (await queue.aclose()) and open it in this one"
            )
        if closing:
            self._token = token  # read by the writer thread only after the next put
            return
        raise QueueError(
            "this queue was opened in a trio.run() that ended without closing it, and "
            "the jobs claimed there are still leased to it; await queue.aclose() in "
            "this one (it releases them), then open it again"
        )

    def _run_ended(self) -> bool:
        assert self._token is not None
        try:
            self._token.run_sync_soon(_nothing)
        except trio.RunFinishedError:
            return True
        return False

    # -- on the trio thread -------------------------------------------------------------

    async def _wait(self, operation: _Operation[T]) -> T:
        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # handed over: wait for the result

        # The writer delivers through run_sync_soon, which runs on this thread: it
        # cannot reschedule the task before the task is parked here.
        result: outcome.Outcome[T] = await trio.lowlevel.wait_task_rescheduled(abort)
        return result.unwrap()

    @staticmethod
    def _deliver(done: list[_Operation[Any]]) -> None:
        for operation in done:
            assert operation.result is not None
            trio.lowlevel.reschedule(operation.task, outcome.Value(operation.result))

    # -- in the writer thread -----------------------------------------------------------

    def _open(self, _: object) -> None:
        self._connection = self._connect()

    def _serve(self, opened: _Operation[None]) -> None:
        opened.result = self._capture(opened, None)
        self._send([opened])
        if self._connection is None:  # opening failed: the caller has the error
            self._stopped = True
            return
        try:
            self._loop(self._connection)
        finally:
            self._connection.close()
            self._connection = None

    def _loop(self, connection: sqlite3.Connection) -> None:
        inbox = self._inbox
        while True:
            first = inbox.get()
            if isinstance(first, _Stop):
                self._finish(connection, first)
                return
            group: list[_Operation[Any]] = [first]
            stop: _Stop | None = None
            while len(group) < MAX_GROUP:
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = item
                    break
                group.append(item)
            try:
                self._commit(connection, group)
            except BaseException as exc:  # a bug of ours: every caller hears of it
                for operation in group:
                    if operation.result is None:
                        operation.result = self._error(exc)
            if not self._send(group):
                return  # the trio run that owned this queue is over
            if stop is not None:
                self._finish(connection, stop)
                return

    def _finish(self, connection: sqlite3.Connection, stop: _Stop) -> None:
        stop.final.result = self._capture(stop.final, connection)
        self._send([stop.final])

    def _send(self, done: list[_Operation[Any]]) -> bool:
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._deliver, done)
        except trio.RunFinishedError:
            return False
        return True

    def _capture(self, operation: _Operation[T], connection: object) -> outcome.Outcome[T]:
        """Run *operation* outside any transaction; its outcome."""
        try:
            return outcome.Value(operation.function(connection, *operation.args))
        except BaseException as exc:
            return self._error(exc)

    def _error(self, exc: BaseException) -> outcome.Error:
        if isinstance(exc, sqlite3.Error):
            error = self._translate(exc)
            error.__cause__ = exc
            return outcome.Error(error)
        return outcome.Error(exc)

    def _commit(self, connection: sqlite3.Connection, group: list[_Operation[Any]]) -> None:
        """Run *group* in one transaction, or each member alone when that fails."""
        waiting = group
        if all(operation.peek is not None for operation in group):
            # A group of looks only (idle claims): answer those with nothing to do
            # without the write lock, so an idle poll never blocks another writer.
            waiting = []
            for operation in group:
                assert operation.peek is not None
                try:
                    busy = operation.peek(connection)
                except Exception:
                    busy = True  # the transaction reports it
                if busy:
                    waiting.append(operation)
                else:
                    operation.result = outcome.Value(operation.idle)
        if not waiting:
            return
        try:
            self._transaction(connection, waiting)
            return
        except _BeginError as failed:
            # No member ran: the lock stayed taken beyond the busy timeout, or the
            # file cannot be written. Each member alone would wait as long again,
            # one after the other (256 members, 256 busy timeouts), for the same
            # answer: every caller gets it now.
            self._fail_all(waiting, failed.error)
            return
        except BaseException as exc:
            if len(waiting) == 1:
                waiting[0].result = self._error(exc)
                return
        # Rolled back: the members run again one a transaction, so that each gets
        # the outcome of its own operation (a full disk fails them all).
        for index, operation in enumerate(waiting):
            try:
                self._transaction(connection, [operation])
            except _BeginError as failed:
                self._fail_all(waiting[index:], failed.error)
                return
            except BaseException as alone:
                operation.result = self._error(alone)

    def _fail_all(self, operations: list[_Operation[Any]], error: BaseException) -> None:
        for operation in operations:
            operation.result = self._error(error)

    def _transaction(self, connection: sqlite3.Connection, group: list[_Operation[Any]]) -> None:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            raise _BeginError(exc) from exc
        try:
            for operation in group:
                try:
                    value = operation.function(connection, *operation.args)
                    operation.result = outcome.Value(value)
                except self._refusals as exc:
                    operation.result = outcome.Error(exc)  # it wrote nothing
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise


class _BeginError(Exception):
    """``BEGIN IMMEDIATE`` failed with *error*: no operation of the group ran."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error
