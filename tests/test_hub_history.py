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
from app.hub import Hub, Resume, Watcher, open_hub
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
            if frame + b"\n\n" == sse.OK:
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
