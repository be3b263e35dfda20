"""The event hub never blocks a publisher; slow subscribers skip ahead."""

from __future__ import annotations

import trio
import trio.testing

from nursery_down._events import EventHub


async def test_publish_never_waits_for_a_slow_subscriber() -> None:
    hub = EventHub(buffer=3)
    subscription = hub.subscribe()
    for n in range(10):
        hub.publish("app", f"event {n}")  # synchronous: cannot block
    assert subscription.skipped == 7
    assert [event.message for event in subscription.drain_nowait()] == [
        "event 7",
        "event 8",
        "event 9",
    ]


async def test_subscription_ends_when_the_hub_closes() -> None:
    hub = EventHub()
    seen: list[int] = []

    async def read() -> None:
        with hub.subscribe() as events:
            async for event in events:
                seen.append(event.seq)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            hub.publish("app", "one")
            hub.publish("app", "two")
            hub.close()
    assert seen == [1, 2]


async def test_closed_subscription_stops_receiving() -> None:
    hub = EventHub()
    subscription = hub.subscribe()
    subscription.close()
    hub.publish("app", "ignored")
    assert list(subscription.drain_nowait()) == []
    assert [event.message for event in hub.history()] == ["ignored"]


async def test_history_is_bounded_and_events_are_plain_data() -> None:
    hub = EventHub(history=2)
    for n in range(3):
        hub.publish("state", f"n{n}", service="svc", state="running", previous="starting")
    history = hub.history()
    assert [event.seq for event in history] == [2, 3]
    data = history[-1].to_dict()
    assert data["service"] == "svc"
    assert data["state"] == "running"
    assert set(data) == {"seq", "time", "kind", "message", "service", "state", "previous", "detail"}
