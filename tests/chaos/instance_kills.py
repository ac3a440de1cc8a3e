"""Chaos phase 4: chatwatch instances killed under load, clients resuming elsewhere.

Two instances (`--history on`) on one nats-server with JetStream and one SQLite store;
clients spread over both; a publisher numbering each conversation's events; then,
in turn, one instance is killed with SIGKILL (no shutdown frame, no goodbye): its
clients notice the dead connection, reconnect to the other instance with
`Last-Event-ID`, and the killed one is started again on its port. Every event after
each client's first `:ok` must arrive exactly once, in order.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from app.store import SQLiteStore
from tests import sseclient
from tests.instances import Instance, flowing, grown
from tests.natsproc import NatsProcess
from tests.polling import holds_within
from tests.ports import free_port
from tests.rawnats import RawNats

CONVERSATIONS = 10
CLIENTS = 60
SETTLE_LIMIT = 30.0


class Reporter(Protocol):
    def check(self, section: str, name: str, value: object, limit: str, ok: bool) -> bool: ...

    def info(self, section: str, name: str, value: object, limit: str = "") -> None: ...


SECTION = "4 instance kills"


@dataclass
class Client:
    cid: str
    home: int  # index of the instance it is on
    last_id: str | None = None
    numbers: list[int] = field(default_factory=list)
    reconnects: int = 0
    refused: int = 0


def _number(frame: bytes) -> tuple[str | None, int | None]:
    event_id = None
    if frame.startswith(b"id: "):
        head, _, frame = frame.partition(b"\n")
        event_id = head[4:].decode()
    if not frame.startswith(b"data: "):
        return event_id, None
    data = json.loads(frame[6:]).get("data")
    return event_id, (data.get("n") if isinstance(data, dict) else None)


async def _follow(client: Client, instances: list[Instance], token: str, stop: trio.Event) -> None:
    """One viewer: watch, and on a dead connection come back on the other instance."""
    first = True
    while not stop.is_set():
        inst = instances[client.home]
        path = f"/api/ai/conversations/{client.cid}/watch" + ("?live_only=1" if first else "")
        headers = {} if client.last_id is None else {"Last-Event-ID": client.last_id}
        try:
            with trio.fail_after(10):
                response = await sseclient.request(inst.port, path, token=token, headers=headers)
            if response.status != 200:
                client.refused += 1
                await response.aclose()
                raise OSError(f"status {response.status}")
            try:
                while True:
                    frame = await response.next_frame(limit=3600)
                    if frame is None:
                        break
                    if frame == b":ok":
                        first = False
                        continue
                    event_id, n = _number(frame)
                    if n is not None:
                        client.numbers.append(n)
                        client.last_id = event_id
            finally:
                await response.aclose()
        except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError):
            pass
        if stop.is_set():
            return
        # The connection ended: the instance died (or is not up yet). The other one.
        client.home = 1 - client.home
        client.reconnects += 1
        await trio.sleep(0.05)


async def run_instance_kills(rep: Reporter, tmp: Path, kills: int, rate: float) -> None:
    nats = NatsProcess()
    await trio.to_thread.run_sync(nats.start)
    instances: list[Instance] = []
    try:
        await _run(rep, tmp, kills, rate, nats, instances)
    finally:
        codes = [await trio.to_thread.run_sync(inst.terminate) for inst in instances]
        rep.info(SECTION, "exit codes at the end (SIGTERM)", codes)
        await trio.to_thread.run_sync(nats.stop)
        text = "".join(inst.log.read_text(errors="replace") for inst in instances)
        tracebacks = text.count("Traceback")
        rep.check(SECTION, "tracebacks in the instances' logs", tracebacks, "0", tracebacks == 0)


async def _run(
    rep: Reporter,
    tmp: Path,
    kills: int,
    rate: float,
    nats: NatsProcess,
    instances: list[Instance],
) -> None:
    db = tmp / "instances.db"
    store = SQLiteStore(db)
    user = await store.add_user("chaos")
    token = await store.create_session(user)
    cids = [await store.create_conversation(user) for _ in range(CONVERSATIONS)]
    await store.aclose()
    for index in range(2):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--bind",
            f"127.0.0.1:{port}",
            "--nats-url",
            nats.url,
            "--database-url",
            f"sqlite:///{db}",
            "--history",
            "on",
            "--max-watchers-per-session",
            "100000",
        ]
        inst = Instance(index, port, cmd, tmp / f"instance-{index}.log")
        instances.append(inst)
        inst.start()
    ready = [await inst.ready() for inst in instances]
    if not rep.check(SECTION, "both instances ready", ready, "<= 30 s", all(ready)):
        return
    clients = [Client(cids[i % CONVERSATIONS], i % 2) for i in range(CLIENTS)]
    published = dict.fromkeys(cids, 0)
    stop_clients = trio.Event()
    stop_publishing = trio.Event()
    pub = await RawNats.connect(nats.client_port)
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(_follow, c, instances, token, stop_clients)

        async def publish() -> None:
            interval = CONVERSATIONS / rate
            while not stop_publishing.is_set():
                await pub.publish_many(
                    [
                        (
                            f"chat.chunk.{cid}",
                            json.dumps({"chunk_type": "token", "n": published[cid]}).encode(),
                        )
                        for cid in cids
                    ]
                )
                for cid in cids:
                    published[cid] += 1
                await trio.sleep(interval)

        nursery.start_soon(publish)

        def published_total() -> int:
            return sum(published.values())

        # Every client live before the first kill.
        await holds_within(lambda: all(c.numbers for c in clients), SETTLE_LIMIT)
        for k in range(kills):
            victim = instances[k % 2]
            await holds_within(flowing(clients, 10 + random.randrange(10)), SETTLE_LIMIT)
            victim.kill()
            # Down while the producer goes on: its clients must resume what it missed.
            await holds_within(grown(published_total, 5 * CONVERSATIONS), SETTLE_LIMIT)
            victim.start()
            if not await victim.ready():
                name = f"instance {victim.index} back after kill {k + 1}"
                rep.check(SECTION, name, "no", "<= 45 s", False)
                break
        await holds_within(flowing(clients, 10), SETTLE_LIMIT)
        stop_publishing.set()
        await pub.flush()
        # Every client has its conversation's last event.
        await holds_within(
            lambda: all(c.numbers and c.numbers[-1] >= published[c.cid] - 1 for c in clients),
            SETTLE_LIMIT,
        )
        stop_clients.set()
        nursery.cancel_scope.cancel()
    await pub.aclose()

    lost = dup = disorder = 0
    for c in clients:
        seen = c.numbers
        if not seen:
            lost += 1
            continue
        expected = list(range(seen[0], published[c.cid]))
        dup += len(seen) - len(set(seen))
        disorder += sum(1 for a, b in itertools.pairwise(seen) if b < a)
        lost += len(set(expected) - set(seen))
    total = sum(len(c.numbers) for c in clients)
    rep.info(SECTION, "kills / clients / conversations", f"{kills} / {CLIENTS} / {CONVERSATIONS}")
    rep.info(SECTION, "events published / delivered", f"{sum(published.values())} / {total}")
    rep.info(SECTION, "client reconnects", sum(c.reconnects for c in clients))
    rep.check(SECTION, "events lost (after first :ok)", lost, "0", lost == 0)
    rep.check(SECTION, "events duplicated", dup, "0", dup == 0)
    rep.check(SECTION, "events out of order", disorder, "0", disorder == 0)
