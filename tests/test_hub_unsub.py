"""The hub on the real bus: the last watcher's `leave` ends the subscription in that step.

When 5000 streams close at once, each trio scheduler pass lasts hundreds of
milliseconds; an UNSUB that waits for the topic's task to unwind, then for the bus's
task and nats-py's flusher, waits a pass per hop (docs/findings.md, "Subscriptions
gone after close"). Counted here, not timed: after the leaves, with no checkpoint in
between, nats-py holds none of the subscriptions and nothing is left to write.
"""

from __future__ import annotations

import trio

from app import natsborder
from app.bus import open_bus
from app.hub import Watcher, open_hub
from tests.natsproc import NatsProcess
from tests.polling import wait_until

CONVERSATIONS = 40
WATCHERS_EACH = 5


def cid(i: int) -> str:
    return f"00000000-1111-4222-8333-{i:012d}"


async def test_last_watchers_leaving_write_their_unsubs_in_that_step(nats: NatsProcess) -> None:
    async with (
        open_bus([nats.url]) as bus,
        open_hub(bus, buffer=8, max_payload=1024, keepalive=3600.0) as hub,
    ):
        watchers: list[Watcher] = []
        with trio.fail_after(10):
            await bus.wait_connected()
            for i in range(CONVERSATIONS):
                watchers += [hub.join(cid(i)) for _ in range(WATCHERS_EACH)]
            async with trio.open_nursery() as nursery:
                for w in watchers:
                    nursery.start_soon(hub.admit, w)
        await wait_until(lambda: len(nats.chat_subscriptions()) == CONVERSATIONS)
        batches, unsubscribes = bus.batches, bus.unsubscribes
        # Every stream ends in one go, as when the load generator closes them all.
        for w in watchers:
            hub.leave(w)
        assert not any(s.startswith("chat.") for s in natsborder.subscribed_subjects(bus.nc))
        assert bus.nc._pending_data_size == 0  # written, not queued for the flusher
        assert bus.unsubscribes == unsubscribes + CONVERSATIONS
        assert bus.batches == batches  # no batch and no PING for departures
        await wait_until(lambda: nats.chat_subscriptions() == [])
        # A conversation watched again right away subscribes again (a new sid).
        again = hub.join(cid(0))
        with trio.fail_after(10):
            await hub.admit(again)
        await wait_until(lambda: len(nats.chat_subscriptions()) == 1)
        hub.leave(again)
        await wait_until(lambda: nats.chat_subscriptions() == [])
