"""PostgresLock against a real server: one holder at a time, handed over, lost, expired."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio
import trio.testing

import nursery_down as nd
from nursery_down.queues import PostgresLock

#: Every wait is bounded by this.
PATIENCE = 15.0


def lock_of(dsn: str, *, lease: float = 1.0) -> PostgresLock:
    return PostgresLock(dsn, "stream-processor", lease=lease, poll_interval=0.05)


async def test_one_holder_at_a_time_and_the_next_takes_over_on_release(
    postgres_dsn: str,
) -> None:
    first, second = lock_of(postgres_dsn), lock_of(postgres_dsn)
    order: list[str] = []
    release_first = trio.Event()
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:

            async def hold_first() -> None:
                async with first.hold():
                    order.append("first holds")
                    # Held past three leases: renewals keep it.
                    await trio.sleep(3 * first.lease)
                    await release_first.wait()
                    order.append("first releases")

            async def hold_second() -> None:
                while order != ["first holds"]:
                    await trio.sleep(0.01)  # polling the first task's progress
                async with second.hold():
                    order.append("second holds")
                    assert second.held

            nursery.start_soon(hold_first)
            nursery.start_soon(hold_second)
            await trio.sleep(4 * first.lease)
            assert order == ["first holds"]  # the second waited all along
            release_first.set()
    assert order == ["first holds", "first releases", "second holds"]
    assert not first.held
    assert not second.held


async def test_a_wait_cancelled_closes_its_connection_and_takes_nothing(
    postgres_dsn: str,
) -> None:
    holder, waiter = lock_of(postgres_dsn), lock_of(postgres_dsn)
    tries = 0
    call = waiter._database.call

    async def counted(function: Any, *args: Any) -> Any:
        nonlocal tries
        tries += 1
        return await call(function, *args)

    waiter._database.call = counted  # type: ignore[method-assign]
    with trio.fail_after(PATIENCE):
        async with holder.hold():
            with trio.move_on_after(0.5 + 2 * waiter.poll_interval) as waited:
                async with waiter.hold():
                    raise AssertionError("the waiter took a held lock")
            assert waited.cancelled_caught
            assert tries >= 2  # it waited, looking again, until cancelled
            assert waiter._database._connection is None  # closed, not left to the collector
            assert not waiter.held
        async with waiter.hold():  # free again, and its row is not in the way
            assert waiter.held


async def test_a_dead_holders_lease_expires(postgres_dsn: str) -> None:
    lock = lock_of(postgres_dsn)
    async with lock.hold():
        pass  # creates the table
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        # A holder that was killed: its lease runs out half a second from now.
        connection.execute(
            "INSERT INTO nd_locks VALUES ('stream-processor', 'elsewhere:41',"
            " gen_random_uuid(), now() + interval '0.5 seconds')"
        )
    with trio.fail_after(PATIENCE):
        started = trio.current_time()
        async with lock.hold():
            waited = trio.current_time() - started
    assert waited >= 0.4


async def test_a_lease_taken_over_cancels_the_block_and_says_so(postgres_dsn: str) -> None:
    lock = lock_of(postgres_dsn)
    reached_end = False

    async def hold_while_stolen() -> None:
        nonlocal reached_end
        async with lock.hold():
            with psycopg.connect(postgres_dsn, autocommit=True) as connection:
                connection.execute(
                    "UPDATE nd_locks SET token = gen_random_uuid(), holder = 'thief:1'"
                )
            with trio.move_on_after(PATIENCE):  # cancelled by the lock at its next renewal
                await trio.sleep_forever()
            reached_end = True

    with trio.fail_after(PATIENCE), pytest.raises(nd.LockLostError, match="was taken over"):
        await hold_while_stolen()
    assert not reached_end
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        (holder,) = connection.execute("SELECT holder FROM nd_locks").fetchone() or ("",)
    assert holder == "thief:1"  # the new holder's lease was left alone


async def test_a_lock_held_twice_by_one_object_is_refused(postgres_dsn: str) -> None:
    lock = lock_of(postgres_dsn)
    with trio.fail_after(PATIENCE):
        async with lock.hold():
            with pytest.raises(nd.ConfigurationError, match="already held, or waited for, by"):
                async with lock.hold():
                    pass


async def test_a_lock_waited_for_twice_by_one_object_is_refused(postgres_dsn: str) -> None:
    holder, waiter = lock_of(postgres_dsn), lock_of(postgres_dsn)
    with trio.fail_after(PATIENCE):
        async with holder.hold(), trio.open_nursery() as nursery:

            async def wait_for_it() -> None:
                async with waiter.hold():
                    pass

            nursery.start_soon(wait_for_it)
            await trio.testing.wait_all_tasks_blocked()  # the first waits
            with pytest.raises(nd.ConfigurationError, match="already held, or waited for, by"):
                async with waiter.hold():
                    pass
            nursery.cancel_scope.cancel()
        assert not waiter.held
        async with waiter.hold():  # free again, and usable again
            assert waiter.held


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dsn": " ", "name": "x"}, "dsn must be a PostgreSQL connection string"),
        ({"dsn": "postgresql:///x", "name": "a b"}, "a lock's name must be"),
        ({"dsn": "postgresql:///x", "name": "x" * 101}, "a lock's name must be"),
        ({"dsn": "postgresql:///x", "name": "x", "lease": 0}, "lease"),
        ({"dsn": "postgresql:///x", "name": "x", "lease": float("nan")}, "lease"),
        (
            {"dsn": "postgresql:///x", "name": "x", "lease": 1, "poll_interval": 2},
            "poll_interval",
        ),
    ],
)
def test_bad_settings_say_what_to_fix(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(nd.ConfigurationError, match=message):
        PostgresLock(**arguments)  # type: ignore[arg-type]
