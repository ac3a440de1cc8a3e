"""Resume across a deploy: a rolling restart of two instances on one NATS.

Issue 8, "Done when": SIGTERM one instance while a producer publishes at 500 events/s
or more; its clients resume on the other with their last id: 0 lost, 0 duplicated.
Both instances are real subprocesses (`python -m app serve --history on`) sharing one
SQLite store and the session's nats-server (JetStream on, stream CHAT).
"""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from tests.conftest import chunk
from tests.natsproc import NatsProcess
from tests.rawnats import RawNats
from tests.resumeclient import Watcher
from tests.served import served
from tests.streams import metrics

CONVERSATIONS = 2
WATCHERS_PER_CONVERSATION = 10
# Per conversation, per tick of TICK s: 2 x 5 events / 10 ms = 1000 events/s in all
# when the machine keeps up (the pace is a target, not asserted: no wall-clock checks).
BATCH = 5
TICK = 0.01
TICKS = 300  # about 3 s
TOTAL = BATCH * TICKS  # events per conversation, numbered 0..TOTAL-1
# A hang guard for the whole run, generous for two loaded cores.
RUN_LIMIT = 120.0


async def produce(pub: RawNats, cids: list[str], halfway: trio.Event) -> None:
    """Numbered events for every conversation, paced; `halfway` is set mid-run."""
    start = trio.current_time()
    for tick in range(TICKS):
        await pub.publish_many(
            [
                (f"chat.chunk.{cid}", chunk("token", n=n))
                for cid in cids
                for n in range(tick * BATCH, (tick + 1) * BATCH)
            ]
        )
        if tick == TICKS // 2:
            await pub.flush()
            halfway.set()
        await trio.sleep_until(start + (tick + 1) * TICK)
    await pub.flush()


async def test_rolling_restart_loses_and_duplicates_nothing(
    nats: NatsProcess, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    history = ("--history", "on")
    with trio.fail_after(RUN_LIMIT):
        async with served(nats, tmp_path / "a", *history, conversations=CONVERSATIONS) as a:
            shared_db = f"sqlite:///{tmp_path / 'a' / 'cw.db'}"
            # B seeds a store of its own (unused): the later --database-url wins.
            async with served(
                nats, tmp_path / "b", *history, "--database-url", shared_db, conversations=0
            ) as b:
                watchers = [
                    Watcher(cid, a.token)
                    for cid in a.cids
                    for _ in range(WATCHERS_PER_CONVERSATION)
                ]
                moved: list[Watcher] = []

                async def watch(w: Watcher, ready: trio.Event) -> None:
                    on_a = await w.open(a.port)
                    ready.set()
                    try:
                        if await w.read(on_a, until=TOTAL - 1):
                            return
                    finally:
                        await on_a.aclose()
                    # A ended the stream (shutdown): go on at B from the last id.
                    moved.append(w)
                    on_b = await w.open(b.port)
                    try:
                        await w.read(on_b, until=TOTAL - 1)
                    finally:
                        await on_b.aclose()

                pub = await RawNats.connect(nats.client_port)
                try:
                    async with trio.open_nursery() as nursery:
                        for w in watchers:
                            ready = trio.Event()
                            nursery.start_soon(watch, w, ready)
                            await ready.wait()
                        halfway = trio.Event()
                        nursery.start_soon(produce, pub, a.cids, halfway)
                        await halfway.wait()
                        a.proc.send_signal(signal.SIGTERM)
                        await a.proc.wait()
                finally:
                    await pub.aclose()
                assert a.proc.returncode == 0, (tmp_path / "a" / "service.log").read_text()
                # What was published while the watchers moved came from B's replay.
                assert _counter(await metrics(b.port), "chatwatch_events_replayed_total") > 0
    # Every watcher was on A when it stopped, and resumed on B.
    assert len(moved) == len(watchers)
    for w in watchers:
        assert w.errors == []
        assert w.connections == 2
        assert w.numbers == list(range(TOTAL)), _summary(w.numbers)


def _counter(text: str, name: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def _summary(numbers: list[int]) -> str:
    """Where a received sequence departs from 0..TOTAL-1: short, unlike the lists."""
    missing = sorted(set(range(TOTAL)) - set(numbers))
    seen: set[int] = set()
    dups = [n for n in numbers if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    return f"{len(numbers)} received, missing {missing[:20]}..., duplicated {dups[:20]}..."
