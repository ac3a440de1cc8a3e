"""The fan-out hub, against a fake bus (unit tests; time is a MockClock)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from app import sse
from app.hub import NATS_LOST, NATS_NOT_AVAILABLE, SLOW_CONSUMER, Hub, Watcher, open_hub
from app.watch import WatchBody
from tests.fakes import FakeBus

CID = "01234567-89ab-cdef-0123-456789abcdef"
OTHER = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
async def bus() -> FakeBus:
    return FakeBus()


@pytest.fixture
async def hub(bus: FakeBus) -> AsyncIterator[Hub]:
    async with open_hub(bus, buffer=8, max_payload=1024, keepalive=15.0) as h:
        yield h


def drain(w: Watcher) -> list[bytes]:
    """Take what is queued, as the response body would (bytes accounting included)."""
    out = []
    while True:
        try:
            out.append(w.outbox.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def admitted(hub: Hub, cid: str = CID, owner: str | None = None) -> Watcher:
    w = hub.join(cid, owner)
    await hub.admit(w)
    assert drain(w) == [sse.OK]
    return w


async def test_one_subscription_per_conversation_and_frames_shared(hub: Hub, bus: FakeBus) -> None:
    a, b = await admitted(hub), await admitted(hub)
    c = await admitted(hub, OTHER)
    assert bus.subscribe_calls == 2
    bus.deliver(f"chat.chunk.{CID}", b'{"chunk_type":"token"}')
    fa, fb, fc = drain(a), drain(b), drain(c)
    assert fa == fb == [b'data: {"event":"token","data":{"chunk_type":"token"}}\n\n']
    assert fa[0] is fb[0]  # encoded once, the same bytes object for every watcher
    assert fc == []
    assert hub.statistics().events_in == 1
    assert hub.statistics().events_out == 2


async def test_last_leave_removes_the_subscription(hub: Hub, bus: FakeBus) -> None:
    a, b = await admitted(hub), await admitted(hub)
    hub.leave(a)
    await trio.testing.wait_all_tasks_blocked()
    assert bus.unsubscribe_calls == 0
    hub.leave(b)
    hub.leave(b)  # idempotent
    await trio.testing.wait_all_tasks_blocked()
    assert bus.unsubscribe_calls == 1
    assert hub.statistics().conversations == 0
    assert hub.statistics().watchers == 0


async def test_leaving_while_subscribing_cancels_the_subscription(hub: Hub, bus: FakeBus) -> None:
    bus.gate = trio.Event()  # the subscription never confirms
    w = hub.join(CID)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.admit, w)
        await trio.testing.wait_all_tasks_blocked()
        assert bus.subscribe_calls == 1
        hub.leave(w)
        nursery.cancel_scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert hub.statistics().conversations == 0
    assert bus.handlers == {}


async def test_bodies_told_of_a_disconnect_leave_and_unsubscribe_in_that_step(
    hub: Hub, bus: FakeBus
) -> None:
    bodies = [WatchBody(hub, CID, None) for _ in range(2)]
    for body in bodies:
        await body.__aenter__()
    await trio.testing.wait_all_tasks_blocked()
    assert hub.statistics().watchers == 2
    for body in bodies:
        body.disconnected()  # as the connection's reader does, before any checkpoint
    assert hub.statistics().watchers == 0
    assert bus.unsubscribe_calls == 1  # the last one's: no task had to run for it
    for body in reversed(bodies):  # (their nurseries close in the reverse order)
        await body.__aexit__(None, None, None)  # the cancellation arriving: nothing left
    assert bus.unsubscribe_calls == 1


async def test_slow_consumer_is_cut_off_alone(hub: Hub, bus: FakeBus) -> None:
    slow, fast = await admitted(hub), await admitted(hub)
    for i in range(20):
        bus.deliver(f"chat.chunk.{CID}", b'{"i":%d}' % i)
        drain(fast)
    assert slow.overflowed
    assert hub.statistics().slow_consumers == 1
    body = WatchBody.for_watcher(hub, slow)
    got = []
    async for chunk in body:
        got.append(chunk)
    assert got[-1] == SLOW_CONSUMER
    assert len(got) == 2  # the buffered frames coalesced into one write, then the error
    assert got[0].count(b"\n\n") == 8
    bus.deliver(f"chat.chunk.{CID}", b"{}")
    assert drain(fast) == [b'data: {"event":"chunk","data":{}}\n\n']


async def test_slow_consumer_by_bytes(bus: FakeBus) -> None:
    async with open_hub(
        bus, buffer=1000, buffer_bytes=1000, max_payload=4096, keepalive=15.0
    ) as hub:
        w = await admitted(hub)
        frame_size = len(b'data: {"event":"chunk","data":"' + b"x" * 290 + b'"}\n\n')
        for _ in range(3):
            bus.deliver(f"chat.chunk.{CID}", b"x" * 290)
        assert hub.statistics().slow_consumers == 0
        assert w.outbox.queued_bytes == 3 * frame_size
        bus.deliver(f"chat.chunk.{CID}", b"x" * 290)  # would pass 1000 bytes
        assert hub.statistics().slow_consumers == 1
        got = [chunk async for chunk in WatchBody.for_watcher(hub, w)]
        assert got[-1] == SLOW_CONSUMER
        assert w.outbox.queued_bytes == 0


async def test_watcher_arriving_while_nats_is_down(hub: Hub, bus: FakeBus) -> None:
    bus.set_connected(False)
    w = hub.join(CID)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.admit, w)
        await trio.testing.wait_all_tasks_blocked()
        assert drain(w) == [NATS_NOT_AVAILABLE]
        bus.set_connected(True)
    assert drain(w) == [sse.OK]


async def test_no_ok_while_nats_is_down_even_for_a_live_conversation(
    hub: Hub, bus: FakeBus
) -> None:
    await admitted(hub)  # the conversation's subscription is live
    bus.set_connected(False)
    late = hub.join(CID)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.admit, late)
        await trio.testing.wait_all_tasks_blocked()
        assert drain(late) == [NATS_NOT_AVAILABLE]  # and no `:ok` yet
        bus.set_connected(True)
    assert drain(late) == [sse.OK]


async def test_events_after_close_go_nowhere_and_raise_nothing(hub: Hub, bus: FakeBus) -> None:
    a = await admitted(hub)
    hub.close(b"retry: 1000\n\n")
    bus.deliver(f"chat.chunk.{CID}", b"{}")  # e.g. still in flight at shutdown
    assert drain(a) == [b"retry: 1000\n\n"]
    assert hub.statistics().slow_consumers == 0


async def test_connection_lost_is_told_once_to_each_open_stream(hub: Hub, bus: FakeBus) -> None:
    a = await admitted(hub)
    waiting = hub.join(OTHER)
    bus.set_connected(False)
    assert drain(a) == [NATS_LOST]
    assert drain(waiting) == [NATS_NOT_AVAILABLE]
    bus.set_connected(True)
    bus.deliver(f"chat.message.{CID}", b"1")
    assert drain(a) == [b'data: {"event":"message","data":1}\n\n']


async def test_keepalive_only_on_idle_conversations(
    autojump_clock: trio.testing.MockClock, bus: FakeBus
) -> None:
    async with open_hub(bus, buffer=8, max_payload=1024, keepalive=15.0) as hub:
        busy, idle = await admitted(hub), await admitted(hub, OTHER)
        start = trio.current_time()

        async def publish_every_second() -> None:
            while True:
                bus.deliver(f"chat.chunk.{CID}", b"{}")
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_every_second)
            await idle.outbox.take(1)  # the first keepalive
            assert trio.current_time() - start == pytest.approx(15.0)
            nursery.cancel_scope.cancel()
        assert sse.KEEPALIVE not in drain(busy)
        assert drain(idle) == []


async def test_subscription_failure_ends_its_streams_not_the_hub(hub: Hub, bus: FakeBus) -> None:
    bus.fail_with = RuntimeError("boom")
    w = hub.join(CID)
    await hub.admit(w)
    frames = drain(w)
    assert frames == [sse.error_frame("subscription failed")]
    bus.fail_with = None
    hub.leave(w)
    ok = await admitted(hub)
    assert not ok.overflowed


async def test_close_sends_the_final_frame_and_ends_every_stream(hub: Hub) -> None:
    a = await admitted(hub)
    hub.close(b"retry: 1000\n\n")
    assert drain(a) == [b"retry: 1000\n\n"]
    with pytest.raises(trio.EndOfChannel):
        a.outbox.receive_nowait()
    with pytest.raises(RuntimeError):
        hub.join(CID)


async def test_owners_are_the_sessions_with_open_watchers(hub: Hub) -> None:
    # (Per-session counts live in limits.Admission; the hub derives who is watching.)
    a = await admitted(hub, owner="s1")
    b = await admitted(hub, owner="s1")
    assert hub.owners() == ["s1"]
    hub.leave(a)
    assert hub.owners() == ["s1"]
    assert "s2" not in hub.owners()
    hub.leave(b)
    assert hub.owners() == []
