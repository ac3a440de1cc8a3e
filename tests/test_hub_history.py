"""The hub with history on, against a fake bus and a fake stream (unit tests of the
seams: live/replay per watcher, live/catch-up per conversation). The real thing, against
nats-server with JetStream, is tests/test_resume.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from app import sse
from app.history import Position
from app.hub import NATS_LOST, Hub, Resume, Watcher, open_hub
from app.jsapi import StoredMessage
from tests.fakes import FakeBus

CID = "01234567-89ab-cdef-0123-456789abcdef"
EPOCH = "ep"


class FakeStream:
    """Stands for `history.History`: a list of stored events; `fetch` can be held."""

    def __init__(self) -> None:
        self.stored: list[StoredMessage] = []
        self.cfg = None
        self.epoch = EPOCH
        self.fetches = 0
        self.gate = trio.Event()
        self.gate.set()

    def store(self, seq: int, kind: str = "chunk") -> StoredMessage:
        m = StoredMessage(seq, f"chat.{kind}.{CID}", json.dumps({"n": seq}).encode())
        self.stored.append(m)
        return m

    def live_subject(self, cid: str) -> str:
        return f"chat.*.{cid}"  # what FakeBus.deliver routes to

    def event_id(self, seq: int) -> str:
        return f"{EPOCH}-{seq}"

    def parse_id(self, raw: str) -> int | str:
        epoch, _, seq = raw.partition("-")
        return int(seq) if epoch == EPOCH and seq.isdigit() else "malformed id"

    async def check_resume(self, cid: str, after: int) -> str | None:
        return None

    async def position(self, cid: str) -> Position:
        chunks = [m.seq for m in self.stored if ".chunk." in m.subject]
        messages = [m.seq for m in self.stored if ".message." in m.subject]
        return Position(max(chunks, default=0), max(messages, default=0))

    async def fetch(self, cid: str, after: int, limit: int = 256) -> tuple[list[Any], bool]:
        self.fetches += 1
        await self.gate.wait()
        out = [m for m in self.stored if m.seq > after][:limit]
        return out, len([m for m in self.stored if m.seq > after]) > limit


def live(bus: FakeBus, m: StoredMessage, previous: int) -> None:
    """Deliver `m` the way the stream republishes it."""
    bus.handlers[f"chat.*.{CID}"](
        f"chatwatch.live.CHAT.{m.subject}",
        m.data,
        {
            "Nats-Sequence": str(m.seq),
            "Nats-Subject": m.subject,
            "Nats-Last-Sequence": str(previous),
        },
    )


@pytest.fixture
async def bus() -> FakeBus:
    return FakeBus()


@pytest.fixture
async def stream() -> FakeStream:
    return FakeStream()


@pytest.fixture
async def hub(bus: FakeBus, stream: FakeStream) -> AsyncIterator[Hub]:
    async with open_hub(bus, buffer=64, max_payload=1024, keepalive=15.0) as h:
        h.set_history(stream)  # type: ignore[arg-type]
        yield h


def seqs(w: Watcher) -> list[int]:
    out: list[int] = []
    while True:
        try:
            chunk = w.outbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return out
        # A replay arrives as chunks of several frames.
        for frame in chunk.split(b"\n\n")[:-1]:
            if frame + b"\n\n" in (sse.OK, NATS_LOST):
                continue
            head, _, _data = frame.partition(b"\n")
            assert head.startswith(b"id: " + EPOCH.encode() + b"-"), frame
            out.append(int(head.rsplit(b"-", 1)[1]))


async def test_a_sequence_gap_is_fetched_and_delivered_before_later_events(
    hub: Hub, bus: FakeBus, stream: FakeStream
) -> None:
    w = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(w)
    m1, m2 = stream.store(1), stream.store(2)
    live(bus, m1, 0)
    live(bus, m2, 1)
    assert seqs(w) == [1, 2]
    m3, m4, m5 = stream.store(3), stream.store(4, "message"), stream.store(5)
    stream.gate = trio.Event()  # the fetch waits: live events meanwhile are held
    live(bus, m5, 3)  # chunk 3 never arrived live: a gap on the chunk subject
    await trio.testing.wait_all_tasks_blocked()
    assert seqs(w) == []
    m6 = stream.store(6)
    live(bus, m6, 5)
    stream.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert seqs(w) == [3, 4, 5, 6]
    assert hub.statistics().gaps_filled == 1
    live(bus, m6, 5)  # a duplicate copy: dropped
    live(bus, stream.store(7), 6)
    assert seqs(w) == [7]
    del m3, m4


async def test_a_reconnect_fetches_what_was_stored_meanwhile(
    hub: Hub, bus: FakeBus, stream: FakeStream
) -> None:
    w = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(w)
    live(bus, stream.store(1), 0)
    assert seqs(w) == [1]
    bus.set_connected(False)
    stream.store(2)
    stream.store(3, "message")
    bus.set_connected(True)
    await trio.testing.wait_all_tasks_blocked()
    frames = []
    while True:
        try:
            frames.append(w.outbox.receive_nowait())
        except trio.WouldBlock:
            break
    assert frames[0] == sse.error_frame("NATS connection lost")
    assert [int(f.split(b"\n")[0].rsplit(b"-", 1)[1]) for f in frames[1:]] == [2, 3]


async def test_replay_and_live_meet_without_gap_or_duplicate(
    hub: Hub, bus: FakeBus, stream: FakeStream
) -> None:
    """Live events that arrive while a watcher's replay is being fetched are held and
    sent after it, minus those the replay already had."""
    first = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(first)
    for seq in (1, 2, 3):
        live(bus, stream.store(seq), seq - 1)
    assert seqs(first) == [1, 2, 3]
    stream.gate = trio.Event()
    w = hub.join(CID, resume=Resume(last_event_id=f"{EPOCH}-1"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.admit, w)
        await trio.testing.wait_all_tasks_blocked()
        # Stored before the fetch reads (so replayed) AND arriving live (so held).
        live(bus, stream.store(4), 3)
        live(bus, stream.store(5), 4)
        stream.gate.set()
    assert seqs(w) == [2, 3, 4, 5]
    live(bus, stream.store(6), 5)
    assert seqs(w) == [6]
    assert seqs(first) == [4, 5, 6]


class SnapStream(FakeStream):
    """Reads the stream when `fetch` is called (as the server does) and answers when
    the gate opens: an answer can be older than the events stored meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.block_after: int | None = None  # hold only fetches after this seq

    async def fetch(self, cid: str, after: int, limit: int = 256) -> tuple[list[Any], bool]:
        self.fetches += 1
        snapshot = [m for m in self.stored if m.seq > after]
        if self.block_after is None or after == self.block_after:
            await self.gate.wait()
        return snapshot[:limit], len(snapshot) > limit


@pytest.fixture
async def snap_hub(bus: FakeBus) -> AsyncIterator[tuple[Hub, SnapStream]]:
    stream = SnapStream()
    async with open_hub(bus, buffer=64, max_payload=1024, keepalive=15.0) as h:
        h.set_history(stream)  # type: ignore[arg-type]
        yield h, stream


async def test_a_shared_replay_page_read_before_an_event_does_not_lose_it(
    snap_hub: tuple[Hub, SnapStream], bus: FakeBus
) -> None:
    """B joins A's page in flight, read before event 4 was stored; 4 went out live
    before B's `:ok`: B must still get it (its replay reaches the topic's cursor)."""
    hub, stream = snap_hub
    first = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(first)
    for s in (1, 2, 3):
        live(bus, stream.store(s), s - 1)
    stream.gate = trio.Event()
    a = hub.join(CID, resume=Resume(last_event_id=f"{EPOCH}-1"))
    b = hub.join(CID, resume=Resume(last_event_id=f"{EPOCH}-1"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.admit, a)
        await trio.testing.wait_all_tasks_blocked()  # A's page read: 2, 3
        live(bus, stream.store(4), 3)
        nursery.start_soon(hub.admit, b)
        await trio.testing.wait_all_tasks_blocked()  # B shares A's page
        stream.gate.set()
    live(bus, stream.store(5), 4)
    assert seqs(a) == [2, 3, 4, 5]
    assert seqs(b) == [2, 3, 4, 5]


async def test_a_replay_ahead_of_a_slow_catch_up_gets_no_duplicates(
    snap_hub: tuple[Hub, SnapStream], bus: FakeBus
) -> None:
    hub, stream = snap_hub
    first = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(first)
    for s in (1, 2):
        live(bus, stream.store(s), s - 1)
    bus.set_connected(False)
    for s in (3, 4, 5):
        stream.store(s)
    stream.gate = trio.Event()
    stream.block_after = 2  # the topic's catch-up (after 2) is slow
    bus.set_connected(True)
    await trio.testing.wait_all_tasks_blocked()
    b = hub.join(CID, resume=Resume(last_event_id=f"{EPOCH}-1"))
    await hub.admit(b)  # its replay (after 1) reads 2..5 at once
    got = seqs(b)
    stream.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    got += seqs(b)
    assert got == [2, 3, 4, 5]
    live(bus, stream.store(6), 5)
    assert seqs(b) == [6]


async def test_events_arriving_before_the_reconnect_report_wait_for_the_catch_up(
    snap_hub: tuple[Hub, SnapStream], bus: FakeBus
) -> None:
    """nats-py delivers again before it reports the reconnect: a message stored during
    the outage must not be skipped by a chunk that arrives first."""
    hub, stream = snap_hub
    w = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(w)
    live(bus, stream.store(1), 0)
    assert seqs(w) == [1]
    bus.set_connected(False)
    stream.store(2, "message")  # stored during the outage
    live(bus, stream.store(3), 1)  # arrives before the reconnect is reported
    bus.set_connected(True)
    await trio.testing.wait_all_tasks_blocked()
    live(bus, stream.store(4, "message"), 2)
    assert seqs(w) == [2, 3, 4]


async def test_a_message_lost_below_the_cursor_is_delivered_late_not_never(
    snap_hub: tuple[Hub, SnapStream], bus: FakeBus
) -> None:
    """Without a reconnect (a route lost one event), the gap shows only when the next
    event of that kind arrives: the missed one goes out then, out of order, not lost."""
    hub, stream = snap_hub
    w = hub.join(CID, resume=Resume(live_only=True))
    await hub.admit(w)
    live(bus, stream.store(1), 0)
    stream.store(2, "message")  # lost on the way
    live(bus, stream.store(3), 1)
    live(bus, stream.store(4, "message"), 2)
    await trio.testing.wait_all_tasks_blocked()
    assert seqs(w) == [1, 3, 2, 4]
