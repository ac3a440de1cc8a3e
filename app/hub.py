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

import functools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from app import ids, sse
from app.errors import BusUnavailable, HistoryError, unwrap_single
from app.events import parse_event
from app.history import History
from app.jsapi import ApiError, JetStreamUnavailable
from app.outbox import Outbox
from app.singleflight import SingleFlight

log = logging.getLogger("chatwatch.hub")

T = TypeVar("T")

NATS_NOT_AVAILABLE = sse.error_frame("NATS not available")
NATS_LOST = sse.error_frame("NATS connection lost")
SLOW_CONSUMER = sse.error_frame("slow consumer: events were arriving faster than they were read")

# (subject, payload, headers): headers as nats-py gives them, a dict or None.
MessageHandler = Callable[[str, bytes, dict[str, str] | None], None]
HISTORY_NOT_AVAILABLE = sse.error_frame("history not available")
EVENTS_MISSING = sse.error_frame("events are missing: they are not in the stream")
# Live messages a topic holds while it fetches what its live path missed; beyond, they
# are dropped and fetched from the stream too.
_TOPIC_HOLD = 10000
_NO_GAP = 2**63
# Catch-ups in a row that find nothing before a gap is taken as final (about 15 s).
_FRUITLESS_LIMIT = 8
_RETRY_MAX = 2.0


@dataclass(frozen=True, slots=True)
class Resume:
    """What a watch request asked for: resume after an id, or live only.

    Neither: a late join (the answer in progress, then live).
    """

    last_event_id: str | None = None
    live_only: bool = False


class BusLike(Protocol):
    """The part of `bus.Bus` the hub uses (a fake implements it in unit tests)."""

    connected: bool

    def add_status_listener(self, listener: Callable[[bool], None]) -> None: ...

    async def wait_connected(self) -> None: ...

    def subscription(
        self, subject: str, handler: MessageHandler
    ) -> AbstractAsyncContextManager[Callable[[], None]]:
        """Entered once subscribed; yields a sync, idempotent early end (`leave`)."""
        ...


@dataclass(frozen=True, slots=True)
class HubStatistics:
    watchers: int
    conversations: int
    events_in: int
    events_out: int
    dropped: int
    slow_consumers: int
    replays: int = 0
    events_replayed: int = 0
    gaps_filled: int = 0
    resumes_refused: int = 0


class Watcher:
    """One SSE client of one conversation: a bounded channel the response drains."""

    __slots__ = (
        "attached",
        "ended",
        "held",
        "held_bytes",
        "outbox",
        "overflowed",
        "owner",
        "replayed",
        "resume",
        "told_down",
        "topic",
    )

    def __init__(
        self,
        topic: Topic,
        outbox: Outbox,
        owner: str | None,
        resume: Resume | None = None,
    ) -> None:
        self.outbox = outbox
        self.topic = topic
        self.owner = owner
        self.resume = resume
        # While the watcher replays history: the live frames that arrived meanwhile,
        # (seq, frame), sent after the replay (those it already replayed are skipped).
        self.held: list[tuple[int, bytes]] | None = None
        self.held_bytes = 0
        # Set when the replay went further than the topic's live path has come (its
        # catch-up is behind): the watcher goes live once the topic reaches this seq.
        self.replayed: int | None = None
        self.attached = False
        self.overflowed = False
        self.told_down = False
        # Ended by the hub (`end_sessions`): never admitted, never delivered to again.
        self.ended = False


class Topic:
    """A watched conversation: its subscription's state and its watchers."""

    __slots__ = (
        "active",
        "attached",
        "conversation_id",
        "cursor",
        "failed",
        "fruitless",
        "gap_from",
        "held",
        "held_overflow",
        "last_on",
        "live",
        "members",
        "release",
        "replaying",
        "scope",
        "wake",
    )

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.members: set[Watcher] = set()
        # Watchers that had `:ok`: the only ones events go to. Every path that closes
        # a watcher's channel (leave, close, overflow) takes it out of here first.
        self.attached: list[Watcher] = []
        # History on: watchers still replaying (they collect live frames in `held`).
        self.replaying: list[Watcher] = []
        # History on: the last stream sequence fanned out, and per kind the last one
        # (checked against each live event's Nats-Last-Sequence to see a gap).
        self.cursor = 0
        self.last_on: dict[str, int] = {"chunk": 0, "message": 0}
        # Not None while the topic fetches what its live path missed: live messages
        # wait here, in order, and go through the live path afterwards.
        self.held: list[tuple[str, bytes, dict[str, str] | None]] | None = None
        self.held_overflow = False
        self.wake = trio.Event()
        # Where the next catch-up starts if a gap was seen on one kind (see _catch_up).
        self.gap_from = _NO_GAP
        # Catch-ups in a row that found nothing to fill.
        self.fruitless = 0
        self.live = trio.Event()
        # Cancelled by the last watcher's `leave`, even mid-subscribe: the bus removes
        # the subscription under a shield, and never cancels a pending flush.
        self.scope = trio.CancelScope()
        # Set once subscribed: ends the subscription at once (sync, idempotent). The
        # last watcher's `leave` calls it, so the UNSUB goes out in that very step
        # instead of after the topic's task has unwound (a scheduler pass later).
        self.release: Callable[[], None] | None = None
        self.active = False
        self.failed = False


@dataclass(frozen=True, slots=True)
class _ReplayPage:
    frames: list[bytes]
    more: bool
    last: int  # the last sequence read (the next page starts after it)


# A replay goes to the outbox in pieces of about this many bytes.
_REPLAY_CHUNK = 64 * 1024
# A replay that read less than the watcher's floor reads again, this often, so long.
_FLOOR_RETRY = 0.05
_FLOOR_TRIES = 100


class ReplayIncomplete(Exception):
    """The stream does not (yet) hold what a replay must include."""


# What a read of the history can fail with: each is a replay that cannot be made now
# (the client is told), never a crash of the watcher's task.
_HISTORY_ERRORS = (
    BusUnavailable,
    ApiError,
    JetStreamUnavailable,
    HistoryError,
    ReplayIncomplete,
    TimeoutError,
)


def _cut_off(w: Watcher) -> bool:
    # A function, not an inline test: the flag changes inside `_push`.
    return w.overflowed


class Hub:
    """Fan-out of NATS events to watchers. Start `run` in a nursery (see `open_hub`).

    History (resume and late join) is decided once, at the first NATS connection
    (`set_history`); topics wait for that decision before they subscribe, because it
    says which subject they subscribe to.
    """

    def __init__(
        self,
        bus: BusLike,
        *,
        buffer: int = 8192,
        buffer_bytes: int = 16 * 1024 * 1024,
        max_payload: int = 1024 * 1024,
        keepalive: float = 15.0,
        replay_cap: int = 5000,
        await_history: bool = False,
        write_window: float = 0.0,
    ) -> None:
        self._bus = bus
        self._write_window = write_window
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._max_payload = max_payload
        self._keepalive = keepalive
        self._replay_cap = replay_cap
        self._topics: dict[str, Topic] = {}
        self._nursery: trio.Nursery | None = None
        self._flights: SingleFlight | None = None
        self._closed = False
        self.history: History | None = None
        self.history_decided = trio.Event()
        if not await_history:
            self.history_decided.set()
        self.watchers = 0
        self.events_in = 0
        self.events_out = 0
        self.dropped = 0
        self.slow_consumers = 0
        self.replays = 0
        self.events_replayed = 0
        self.gaps_filled = 0
        self.resumes_refused = 0
        bus.add_status_listener(self._on_bus_status)

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            watchers=self.watchers,
            conversations=len(self._topics),
            events_in=self.events_in,
            events_out=self.events_out,
            dropped=self.dropped,
            slow_consumers=self.slow_consumers,
            replays=self.replays,
            events_replayed=self.events_replayed,
            gaps_filled=self.gaps_filled,
            resumes_refused=self.resumes_refused,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def set_history(self, history: History | None) -> None:
        """Decide, once, whether streams are resumable (None: core NATS, no ids)."""
        self.history = history
        self.history_decided.set()

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._flights = SingleFlight(nursery)
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
            topic.replaying.clear()
            for w in list(topic.members):
                w.held = None
                w.outbox.put_last(final)

    def owners(self) -> list[str]:
        """The sessions (token hashes) with at least one open watcher.

        Derived, not counted: the limits already count per session (limits.py), and
        this is asked every few seconds, not per event.
        """
        return list({w.owner for t in self._topics.values() for w in t.members if w.owner})

    def end_sessions(self, finals: dict[str, bytes]) -> int:
        """End every watcher whose owner is in `finals` with that final frame (sync).

        The watcher leaves the fan-out before the frame is queued and its channel is
        closed after it: nothing reaches the stream after the final frame. Returns
        how many watchers were ended.
        """
        ended = 0
        for topic in list(self._topics.values()):
            for w in list(topic.members):
                final = finals.get(w.owner) if w.owner is not None else None
                if final is None or w.ended:
                    continue
                w.ended = True
                self._detach(w)
                w.outbox.put_last(final)
                ended += 1
        return ended

    # -- watchers --------------------------------------------------------------

    def join(
        self, conversation_id: str, owner: str | None = None, resume: Resume | None = None
    ) -> Watcher:
        """Register a watcher (sync). Its subscription starts if it is the first.

        `conversation_id` must come from `ids.parse_conversation_id`.
        """
        if self._nursery is None or self._closed:
            raise RuntimeError("hub is not running")
        topic = self._topics.get(conversation_id)
        if topic is None:
            topic = self._topics[conversation_id] = Topic(conversation_id)
            self._nursery.start_soon(self._run_topic, topic, name=f"topic {conversation_id}")
        outbox = Outbox(self._buffer, self._buffer_bytes, self._write_window)
        w = Watcher(topic, outbox, owner, resume)
        topic.members.add(w)
        self.watchers += 1
        return w

    async def admit(self, w: Watcher) -> None:
        """Tell the watcher about NATS if it is down, wait for the subscription, `:ok`.

        The `:ok` frame and the watcher's place in the fan-out are set in one
        synchronous step after the SUB was confirmed by the server: every event
        published after the client saw `:ok` reaches it, in order. With history on,
        the replay (resume or late join) follows `:ok`, in this watcher's own task.
        """
        topic = w.topic
        if not self._bus.connected and not w.told_down:
            w.told_down = True
            self._push(w, NATS_NOT_AVAILABLE)
        if not topic.live.is_set():
            # (Not awaited when already set: a watcher of a live conversation is
            # admitted in its task's first step, one scheduler pass fewer per connect.)
            await topic.live.wait()
        # A conversation that was live before an outage stays "live" (nats-py replays
        # its SUB on reconnect and flushes before saying so): `:ok` must still wait
        # for the connection, or events published meanwhile would be owed and lost.
        await self._bus.wait_connected()
        history = self.history
        resume = w.resume or Resume()
        replay_from: int | None = None
        refused: bytes | None = None
        if history is not None and not resume.live_only:
            # Where the replay starts is fixed before `:ok`: every event published after
            # the client saw `:ok` is after that point, so it is replayed or live.
            try:
                replay_from, refused = await self._replay_start(w, history, resume)
            except _HISTORY_ERRORS as exc:
                log.warning("replay for %s not possible: %s", topic.conversation_id, exc)
                refused = sse.error_frame("history not available: the replay failed")
        if w.overflowed or w.ended or topic.failed or self._closed or w not in topic.members:
            return
        self._push(w, sse.OK)
        if refused is not None:
            self._push(w, refused)
        elif history is None and resume.last_event_id is not None and not resume.live_only:
            self._push(w, HISTORY_NOT_AVAILABLE)
        if _cut_off(w):
            return
        if history is None or replay_from is None:
            w.attached = True
            topic.attached.append(w)
            return
        # Live frames collect in `held` from here, before the fetch starts: everything
        # stored after the fetch's last read is among them.
        w.held = []
        topic.replaying.append(w)
        # Everything up to here went out live before `held` started: the replay must
        # reach at least this far (a shared page or a replica may be older than that).
        floor = topic.cursor
        try:
            replayed = await self._send_replay(w, history, replay_from, floor)
        except _HISTORY_ERRORS as exc:
            log.warning("replay for conversation %s failed: %s", topic.conversation_id, exc)
            self._push(w, sse.error_frame("history not available: the replay failed"))
            replayed = replay_from
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return  # cut off (slow consumer, shutdown, revoked) while replaying
        self._go_live(w, replayed)

    async def _replay_start(
        self, w: Watcher, history: History, resume: Resume
    ) -> tuple[int, bytes | None]:
        """The sequence to replay after, and the error frame for a refused id, if any.

        A resume from a usable id starts at that id; anything else is a late join, from
        the conversation's last `message` event (0: its first event).
        """
        cid = w.topic.conversation_id
        refused: bytes | None = None
        raw = resume.last_event_id
        if raw is not None:
            parsed = history.parse_id(raw)
            reason = parsed if isinstance(parsed, str) else None
            if isinstance(parsed, int):
                after = parsed
                reason = await self._shared(
                    ("check", cid, after), lambda: history.check_resume(cid, after)
                )
                if reason is None:
                    return parsed, None
            self.resumes_refused += 1
            shown = raw if len(raw) <= 64 else raw[:64] + "..."
            refused = sse.error_frame(f"cannot resume from {shown}: {reason}")
        position = await self._shared(("position", cid), lambda: history.position(cid))
        return position.message, refused

    async def _send_replay(self, w: Watcher, history: History, after: int, floor: int) -> int:
        cid = w.topic.conversation_id
        cap = self._replay_cap
        kept: deque[bytes] = deque(maxlen=cap)
        seen = 0
        last = after
        more = True
        tries = 0
        while more or last < floor:
            if more:
                # Shared with concurrent identical reads (a reconnect storm).
                page = await self._shared(
                    ("frames", cid, last),
                    functools.partial(self._replay_page, history, cid, last),
                )
            else:
                # The answer was read before events this watcher did not get live were
                # stored (or by a replica behind the leader): read again, on its own.
                tries += 1
                if tries > _FLOOR_TRIES:
                    raise ReplayIncomplete(f"the stream did not reach seq {floor}")
                await trio.sleep(_FLOOR_RETRY)
                page = await self._replay_page(history, cid, last)
            seen += len(page.frames)
            kept.extend(page.frames)
            more = page.more
            last = max(last, page.last)
        self.replays += 1
        if seen > cap:
            await w.outbox.put(
                sse.error_frame(
                    f"replay capped at {cap} events: the {seen - cap} oldest were left out"
                )
            )
        # Written in chunks: one outbox slot and one write for many frames.
        chunk: list[bytes] = []
        size = 0
        for frame in kept:
            chunk.append(frame)
            size += len(frame)
            if size >= _REPLAY_CHUNK:
                await w.outbox.put(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await w.outbox.put(b"".join(chunk))
        self.events_replayed += len(kept)
        # Live frames (held meanwhile) go next: leave them half the byte budget.
        await w.outbox.wait_room(self._buffer_bytes // 2)
        return last

    async def _replay_page(self, history: History, cid: str, after: int) -> _ReplayPage:
        """One page of a replay, framed once for every watcher that asks for it."""
        batch, more = await history.fetch(cid, after)
        frames = []
        last = after
        for m in batch:
            last = m.seq
            event = parse_event(
                m.subject.split(".")[1], m.data, self._max_payload, history.event_id(m.seq)
            )
            if event is not None:
                frames.append(event.frame)
        return _ReplayPage(frames, more and bool(batch), last)

    async def _shared(self, key: tuple[object, ...], fn: Callable[[], Awaitable[T]]) -> T:
        """A replay read, shared with concurrent identical ones (a reconnect storm)."""
        assert self._flights is not None
        return await self._flights.call(key, fn)

    def _go_live(self, w: Watcher, replayed: int) -> None:
        """The seam, in one synchronous step: held frames after the replay, then live.

        If the replay went further than the topic's live path has come (the topic is
        still catching up after a reconnect), the watcher keeps collecting until the
        topic reaches `replayed` (see `_fanout`): attached now, it would get the
        catch-up's events a second time.
        """
        topic = w.topic
        if w.overflowed or w.ended or w not in topic.members or self._closed:
            self._detach(w)
            return
        if replayed > topic.cursor and w.held is not None:
            w.replayed = replayed
            return
        self._promote(w, replayed)

    def _promote(self, w: Watcher, replayed: int) -> None:
        topic = w.topic
        held, w.held = w.held, None
        w.replayed = None
        if w in topic.replaying:
            topic.replaying.remove(w)
        for seq, frame in held or ():
            if seq > replayed:
                self._push(w, frame)
        w.held_bytes = 0
        if not w.overflowed:
            w.attached = True
            topic.attached.append(w)

    def leave(self, w: Watcher) -> None:
        """Forget the watcher (sync, idempotent); the last one ends the subscription."""
        topic = w.topic
        if w not in topic.members:
            return
        topic.members.discard(w)
        self._detach(w)
        w.outbox.close()
        self.watchers -= 1
        if not topic.members:
            if self._topics.get(topic.conversation_id) is topic:
                del self._topics[topic.conversation_id]
            release, topic.release = topic.release, None
            if release is not None:
                release()
            topic.scope.cancel()

    def _detach(self, w: Watcher) -> None:
        if w.attached:
            w.attached = False
            w.topic.attached.remove(w)
        if w.held is not None:
            w.held = None
            w.topic.replaying.remove(w)

    # -- delivery ----------------------------------------------------------------

    def _push(self, w: Watcher, frame: bytes) -> None:
        if not w.outbox.offer(frame):
            self._overflow(w)

    def _overflow(self, w: Watcher) -> None:
        # The buffered frames stay readable, then the stream ends with SLOW_CONSUMER.
        w.overflowed = True
        self.slow_consumers += 1
        self._detach(w)
        w.outbox.close()
        log.info("slow consumer cut off (conversation %s)", w.topic.conversation_id)

    def _deliver(self, topic: Topic, subject: str, payload: bytes, _headers: object) -> None:
        """The NATS message handler (history off): runs inside nats-py's callback."""
        self.events_in += 1
        parts = subject.split(".")
        event = parse_event(parts[1], payload, self._max_payload) if len(parts) == 3 else None
        if event is None:
            self.dropped += 1
            return
        self._fanout(topic, event.frame)

    def _fanout(self, topic: Topic, frame: bytes, seq: int = 0) -> None:
        topic.active = True
        # A watcher over either limit of its outbox is a slow consumer: cut off alone,
        # after the loop, while the rest get the frame.
        slow: list[Watcher] | None = None
        size = len(frame)
        cap = self._buffer_bytes - size
        for w in topic.attached:
            if not w.outbox.offer(frame):
                if slow is None:
                    slow = []
                slow.append(w)
        self.events_out += len(topic.attached)
        ready: list[Watcher] | None = None
        if topic.replaying:
            for w in topic.replaying:
                held = w.held
                assert held is not None
                if len(held) < self._buffer and w.held_bytes <= cap:
                    held.append((seq, frame))
                    w.held_bytes += size
                    if w.replayed is not None and seq >= w.replayed:
                        if ready is None:
                            ready = []
                        ready.append(w)
                else:
                    if slow is None:
                        slow = []
                    slow.append(w)
        if slow is not None:
            for w in slow:
                if w.attached:
                    self.events_out -= 1
                self._overflow(w)
        if ready is not None:
            # The topic has reached where these watchers' replays ended.
            for w in ready:
                if w.held is not None and w.replayed is not None:
                    self._promote(w, w.replayed)

    # -- history: the live path with positions -----------------------------------

    def _deliver_live(
        self, topic: Topic, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        """The NATS message handler (history on): a republished, numbered event.

        Events at or below the cursor were delivered already (a replayed catch-up, or
        a copy in flight from before the subscription); an event whose previous
        sequence on its subject is not the one delivered last means the live path
        missed something: the topic holds live events and fetches the gap.
        """
        self.events_in += 1
        self._live_event(topic, subject, payload, headers)

    def _live_event(
        self, topic: Topic, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        held = topic.held
        if held is not None:
            if len(held) < _TOPIC_HOLD:
                held.append((subject, payload, headers))
            else:
                topic.held_overflow = True
            return
        try:
            assert headers is not None
            seq = int(headers["Nats-Sequence"])
            kind = headers["Nats-Subject"].split(".")[1]
            previous = int(headers.get("Nats-Last-Sequence", "-1"))
        except (AssertionError, KeyError, ValueError, IndexError):
            self.dropped += 1
            return
        if seq <= topic.cursor:
            return
        if kind in topic.last_on and previous != topic.last_on[kind]:
            if topic.fruitless >= _FRUITLESS_LIMIT and previous > topic.last_on[kind]:
                # The stream no longer has (or never had) what is missing: say so once,
                # and go on rather than hold this conversation forever.
                log.warning(
                    "conversation %s: events of %s between %d and %d are not in the stream",
                    topic.conversation_id,
                    kind,
                    topic.last_on[kind],
                    previous,
                )
                topic.fruitless = 0
                for w in topic.attached:
                    self._push(w, EVENTS_MISSING)
            else:
                log.info(
                    "conversation %s: gap before seq %d (%s after %d, expected %d); fetching",
                    topic.conversation_id,
                    seq,
                    kind,
                    previous,
                    topic.last_on[kind],
                )
                # Fetch from the last event of this kind: a missed event of the other
                # kind may lie below the cursor already (delivered late, not lost).
                topic.gap_from = min(topic.gap_from, topic.last_on[kind])
                topic.held = [(subject, payload, headers)]
                topic.wake.set()
                return
        self._deliver_stored(topic, kind, seq, payload)

    def _deliver_stored(self, topic: Topic, kind: str, seq: int, payload: bytes) -> None:
        topic.cursor = max(topic.cursor, seq)
        if kind in topic.last_on:
            topic.last_on[kind] = seq
        history = self.history
        assert history is not None
        event = parse_event(kind, payload, self._max_payload, history.event_id(seq))
        if event is None:
            self.dropped += 1
            return
        self._fanout(topic, event.frame, seq)

    def _release_held(self, topic: Topic) -> None:
        held, topic.held = topic.held, None
        for subject, payload, headers in held or ():
            self._live_event(topic, subject, payload, headers)

    async def _catch_up(self, topic: Topic, history: History) -> None:
        """Fetch and fan out everything after the cursor, then release held live events.

        Normally from the cursor. After a gap on one kind, from the last event of that
        kind: an event of it that the live path lost below the cursor (later events of
        the other kind went out first) is delivered late rather than never.
        """
        cid = topic.conversation_id
        delay = 0.05
        filled = 0
        if topic.fruitless:
            # The last catch-up found nothing (a replica behind, an event not stored
            # yet): do not ask again at once.
            await trio.sleep(min(_FLOOR_RETRY * 2**topic.fruitless, _RETRY_MAX))
        start = min(topic.cursor, topic.gap_from)
        topic.gap_from = _NO_GAP
        while True:
            try:
                batch, more = await history.fetch(cid, start)
            except _HISTORY_ERRORS as exc:
                log.info("conversation %s: catch-up waits (%s)", cid, exc)
                await self._bus.wait_connected()
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            for m in batch:
                kind = m.subject.split(".")[1]
                if m.seq > topic.cursor:
                    filled += 1
                    self._deliver_stored(topic, kind, m.seq, m.data)
                elif m.seq > topic.last_on.get(kind, m.seq):
                    filled += 1
                    self._deliver_late(topic, kind, m.seq, m.data)
            if batch:
                start = batch[-1].seq
            if more and batch:
                continue
            if topic.held_overflow:
                # Live events were dropped while we fetched: they are in the stream.
                topic.held_overflow = False
                topic.held = []
                continue
            break
        if filled:
            self.gaps_filled += 1
            topic.fruitless = 0
            log.info("conversation %s: %d missed events delivered from the stream", cid, filled)
        else:
            topic.fruitless += 1
        self._release_held(topic)

    def _deliver_late(self, topic: Topic, kind: str, seq: int, payload: bytes) -> None:
        """An event the live path lost, found below the cursor: out of order, not lost."""
        log.warning(
            "conversation %s: seq %d (%s) delivered after later events (seq %d)",
            topic.conversation_id,
            seq,
            kind,
            topic.cursor,
        )
        self._deliver_stored(topic, kind, seq, payload)  # the cursor stays where it is

    async def _start_position(self, topic: Topic, history: History) -> None:
        delay = 0.05
        while True:
            try:
                position = await history.position(topic.conversation_id)
            except _HISTORY_ERRORS as exc:
                log.info("conversation %s: position waits (%s)", topic.conversation_id, exc)
                await self._bus.wait_connected()
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            topic.cursor = position.last
            topic.last_on = {"chunk": position.chunk, "message": position.message}
            return

    async def _run_topic(self, topic: Topic) -> None:
        cid = topic.conversation_id
        with topic.scope:
            try:
                await self.history_decided.wait()
                history = self.history
                if history is None:
                    await self._run_core_topic(topic)
                else:
                    await self._run_history_topic(topic, history)
            except Exception:
                # A subscription that cannot be made must not take the process down:
                # its watchers are told and their streams end; the next watcher retries.
                log.exception("subscription for conversation %s failed", cid)
                self._fail_topic(topic)
            finally:
                # The release refers to the subscription, whose handler refers to the
                # topic: dropped here, so that no cycle outlives the task.
                topic.release = None

    async def _run_core_topic(self, topic: Topic) -> None:
        def handler(subject: str, payload: bytes, headers: object) -> None:
            self._deliver(topic, subject, payload, headers)

        subject = ids.watch_subject(topic.conversation_id)
        async with self._bus.subscription(subject, handler) as release:
            topic.release = release
            topic.live.set()
            await trio.sleep_forever()

    async def _run_history_topic(self, topic: Topic, history: History) -> None:
        cid = topic.conversation_id

        def live(subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
            self._deliver_live(topic, subject, payload, headers)

        # Hold live events until the position is known: those at or below it are
        # dropped, the rest fanned out in order.
        topic.held = []
        async with self._bus.subscription(history.live_subject(cid), live) as release:
            topic.release = release
            await self._start_position(topic, history)
            self._release_held(topic)
            topic.live.set()
            while True:
                await topic.wake.wait()
                topic.wake = trio.Event()
                if topic.held is not None:
                    await self._catch_up(topic, history)

    def _fail_topic(self, topic: Topic) -> None:
        topic.failed = True
        topic.live.set()
        if self._topics.get(topic.conversation_id) is topic:
            del self._topics[topic.conversation_id]
        failed = sse.error_frame("subscription failed")
        for w in list(topic.members):
            self._detach(w)
            self._push(w, failed)
            w.outbox.close()

    def _on_bus_status(self, connected: bool) -> None:
        if self.history is not None:
            for topic in self._topics.values():
                if not topic.live.is_set():
                    continue
                if not connected:
                    # Hold from the disconnect on: nats-py delivers again as soon as it
                    # has re-sent the SUBs, before it reports the reconnect, and what
                    # was stored meanwhile must go out first.
                    if topic.held is None:
                        topic.held = []
                else:
                    if topic.held is None:
                        topic.held = []
                    topic.wake.set()
        if connected:
            return
        for topic in self._topics.values():
            for w in list(topic.members):
                if w.attached or w.held is not None:
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
                # The readers of this topic's streams run before the next topic's get
                # their comment: an idle outbox holds no deque (app/outbox.py), and
                # one pass over every stream would make them all at once, a
                # high-water mark the heap keeps (docs/findings.md, idle memory).
                await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_hub(
    bus: BusLike,
    *,
    buffer: int,
    max_payload: int,
    keepalive: float,
    buffer_bytes: int = 16 * 1024 * 1024,
    replay_cap: int = 5000,
    await_history: bool = False,
    write_window: float = 0.0,
) -> AsyncGenerator[Hub, None]:
    """A running hub; its subscriptions are removed when the block exits."""
    hub = Hub(
        bus,
        buffer=buffer,
        buffer_bytes=buffer_bytes,
        max_payload=max_payload,
        keepalive=keepalive,
        replay_cap=replay_cap,
        await_history=await_history,
        write_window=write_window,
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
