"""The fan-out hub: one NATS subscription per watched conversation, shared by watchers.

Each event is parsed and framed once (`events.parse_event`) and the same bytes go to
every watcher. Each watcher has a bounded trio memory channel; publishing never
blocks: a watcher whose buffer is full is a slow consumer and is cut off alone.

Lifetimes: the hub's nursery owns one task per conversation (the subscription, from
the first watcher's arrival to the last one's departure) plus the keepalive and
status tasks. A watcher owns nothing here; `leave` is synchronous, so it runs in any
`finally`, cancelled or not.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import trio

from app import ids, sse
from app.errors import unwrap_single
from app.events import parse_event

log = logging.getLogger("chatwatch.hub")

NATS_NOT_AVAILABLE = sse.error_frame("NATS not available")
NATS_LOST = sse.error_frame("NATS connection lost")
SLOW_CONSUMER = sse.error_frame("slow consumer: events were arriving faster than they were read")

# (subject, payload, headers): headers as nats-py gives them, a dict or None.
MessageHandler = Callable[[str, bytes, dict[str, str] | None], None]


class BusLike(Protocol):
    """The part of `bus.Bus` the hub uses (a fake implements it in unit tests)."""

    connected: bool

    def add_status_listener(self, listener: Callable[[bool], None]) -> None: ...

    async def wait_connected(self) -> None: ...

    def subscription(
        self, subject: str, handler: MessageHandler
    ) -> AbstractAsyncContextManager[None]: ...


@dataclass(frozen=True, slots=True)
class HubStatistics:
    watchers: int
    conversations: int
    events_in: int
    events_out: int
    dropped: int
    slow_consumers: int


class Watcher:
    """One SSE client of one conversation: a bounded channel the response drains."""

    __slots__ = (
        "attached",
        "overflowed",
        "owner",
        "queued_bytes",
        "recv",
        "send",
        "told_down",
        "topic",
    )

    def __init__(self, topic: Topic, buffer: int, owner: str | None) -> None:
        self.send, self.recv = trio.open_memory_channel[bytes](buffer)
        self.topic = topic
        self.owner = owner
        self.attached = False
        self.overflowed = False
        self.told_down = False
        # Bytes of frames queued and not yet taken by the response (see WatchBody).
        self.queued_bytes = 0


class Topic:
    """A watched conversation: its subscription's state and its watchers."""

    __slots__ = ("active", "attached", "conversation_id", "failed", "live", "members", "scope")

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.members: set[Watcher] = set()
        # Watchers that had `:ok`: the only ones events go to. Every path that closes
        # a watcher's channel (leave, close, overflow) takes it out of here first.
        self.attached: list[Watcher] = []
        self.live = trio.Event()
        # Cancelled by the last watcher's `leave`, even mid-subscribe: the bus removes
        # the subscription under a shield, and never cancels a pending flush.
        self.scope = trio.CancelScope()
        self.active = False
        self.failed = False


class Hub:
    """Fan-out of NATS events to watchers. Start `run` in a nursery (see `open_hub`)."""

    def __init__(
        self,
        bus: BusLike,
        *,
        buffer: int = 8192,
        buffer_bytes: int = 16 * 1024 * 1024,
        max_payload: int = 1024 * 1024,
        keepalive: float = 15.0,
    ) -> None:
        self._bus = bus
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._max_payload = max_payload
        self._keepalive = keepalive
        self._topics: dict[str, Topic] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._per_owner: dict[str, int] = {}
        self.watchers = 0
        self.events_in = 0
        self.events_out = 0
        self.dropped = 0
        self.slow_consumers = 0
        bus.add_status_listener(self._on_bus_status)

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            watchers=self.watchers,
            conversations=len(self._topics),
            events_in=self.events_in,
            events_out=self.events_out,
            dropped=self.dropped,
            slow_consumers=self.slow_consumers,
        )

    def watchers_of(self, owner: str) -> int:
        return self._per_owner.get(owner, 0)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keepalive_loop)
            task_status.started()
            await trio.sleep_forever()

    def close(self, final: bytes) -> None:
        """Send `final` to every watcher and end every stream; refuse new watchers."""
        self._closed = True
        for topic in list(self._topics.values()):
            # No more deliveries: every stream's channel is about to close.
            for w in topic.attached:
                w.attached = False
            topic.attached.clear()
            for w in list(topic.members):
                with contextlib.suppress(
                    trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
                ):
                    w.send.send_nowait(final)
                w.send.close()

    # -- watchers --------------------------------------------------------------

    def join(self, conversation_id: str, owner: str | None = None) -> Watcher:
        """Register a watcher (sync). Its subscription starts if it is the first.

        `conversation_id` must come from `ids.parse_conversation_id`.
        """
        if self._nursery is None or self._closed:
            raise RuntimeError("hub is not running")
        topic = self._topics.get(conversation_id)
        if topic is None:
            topic = self._topics[conversation_id] = Topic(conversation_id)
            self._nursery.start_soon(self._run_topic, topic, name=f"topic {conversation_id}")
        w = Watcher(topic, self._buffer, owner)
        topic.members.add(w)
        self.watchers += 1
        if owner is not None:
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        return w

    async def admit(self, w: Watcher) -> None:
        """Tell the watcher about NATS if it is down, wait for the subscription, `:ok`.

        The `:ok` frame and the watcher's place in the fan-out are set in one
        synchronous step after the SUB was confirmed by the server: every event
        published after the client saw `:ok` reaches it, in order.
        """
        topic = w.topic
        if not self._bus.connected and not w.told_down:
            w.told_down = True
            self._push(w, NATS_NOT_AVAILABLE)
        await topic.live.wait()
        # A conversation that was live before an outage stays "live" (nats-py replays
        # its SUB on reconnect and flushes before saying so): `:ok` must still wait
        # for the connection, or events published meanwhile would be owed and lost.
        await self._bus.wait_connected()
        if w.overflowed or topic.failed or self._closed or w not in topic.members:
            return
        self._push(w, sse.OK)
        if not w.overflowed:
            w.attached = True
            topic.attached.append(w)

    def leave(self, w: Watcher) -> None:
        """Forget the watcher (sync, idempotent); the last one ends the subscription."""
        topic = w.topic
        if w not in topic.members:
            return
        topic.members.discard(w)
        if w.attached:
            w.attached = False
            topic.attached.remove(w)
        w.send.close()
        self.watchers -= 1
        if w.owner is not None:
            left = self._per_owner[w.owner] - 1
            if left:
                self._per_owner[w.owner] = left
            else:
                del self._per_owner[w.owner]
        if not topic.members:
            if self._topics.get(topic.conversation_id) is topic:
                del self._topics[topic.conversation_id]
            topic.scope.cancel()

    # -- delivery ----------------------------------------------------------------

    def _push(self, w: Watcher, frame: bytes) -> None:
        try:
            w.send.send_nowait(frame)
            w.queued_bytes += len(frame)
        except trio.WouldBlock:
            self._overflow(w)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _overflow(self, w: Watcher) -> None:
        # The buffered frames stay readable, then the stream ends with SLOW_CONSUMER.
        w.overflowed = True
        self.slow_consumers += 1
        if w.attached:
            w.attached = False
            w.topic.attached.remove(w)
        w.send.close()
        log.info("slow consumer cut off (conversation %s)", w.topic.conversation_id)

    def _deliver(self, topic: Topic, subject: str, payload: bytes) -> None:
        """The NATS message handler: runs synchronously inside nats-py's callback."""
        self.events_in += 1
        parts = subject.split(".")
        event = parse_event(parts[1], payload, self._max_payload) if len(parts) == 3 else None
        if event is None:
            self.dropped += 1
            return
        frame = event.frame
        topic.active = True
        # A watcher over either limit (frames, via WouldBlock; bytes, checked here) is
        # a slow consumer: cut off alone, after the loop, while the rest get the frame.
        slow: list[Watcher] | None = None
        size = len(frame)
        cap = self._buffer_bytes - size
        for w in topic.attached:
            if w.queued_bytes <= cap:
                try:
                    w.send.send_nowait(frame)
                except trio.WouldBlock:
                    pass
                else:
                    w.queued_bytes += size
                    continue
            if slow is None:
                slow = []
            slow.append(w)
        self.events_out += len(topic.attached)
        if slow is not None:
            self.events_out -= len(slow)
            for w in slow:
                self._overflow(w)

    async def _run_topic(self, topic: Topic) -> None:
        cid = topic.conversation_id

        def handler(subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
            self._deliver(topic, subject, payload)

        with topic.scope:
            try:
                async with self._bus.subscription(ids.watch_subject(cid), handler):
                    topic.live.set()
                    await trio.sleep_forever()
            except Exception:
                # A subscription that cannot be made must not take the process down:
                # its watchers are told and their streams end; the next watcher retries.
                log.exception("subscription for conversation %s failed", cid)
                self._fail_topic(topic)

    def _fail_topic(self, topic: Topic) -> None:
        topic.failed = True
        topic.live.set()
        if self._topics.get(topic.conversation_id) is topic:
            del self._topics[topic.conversation_id]
        failed = sse.error_frame("subscription failed")
        for w in list(topic.members):
            self._push(w, failed)
            w.send.close()

    def _on_bus_status(self, connected: bool) -> None:
        if connected:
            return
        for topic in self._topics.values():
            for w in list(topic.members):
                if w.attached:
                    self._push(w, NATS_LOST)
                elif not w.told_down:
                    w.told_down = True
                    self._push(w, NATS_NOT_AVAILABLE)

    async def _keepalive_loop(self) -> None:
        # One task for every watcher: a topic that carried no event during the last
        # interval gets a keepalive comment on each of its streams. Writes are also
        # how a peer that vanished without FIN/RST is noticed.
        while True:
            await trio.sleep(self._keepalive)
            for topic in list(self._topics.values()):
                if topic.active:
                    topic.active = False
                    continue
                for w in list(topic.members):
                    self._push(w, sse.KEEPALIVE)


@asynccontextmanager
async def open_hub(
    bus: BusLike,
    *,
    buffer: int,
    max_payload: int,
    keepalive: float,
    buffer_bytes: int = 16 * 1024 * 1024,
) -> AsyncGenerator[Hub, None]:
    """A running hub; its subscriptions are removed when the block exits."""
    hub = Hub(
        bus,
        buffer=buffer,
        buffer_bytes=buffer_bytes,
        max_payload=max_payload,
        keepalive=keepalive,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            try:
                yield hub
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise unwrap_single(group) from None
