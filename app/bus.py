"""The NATS border: the only module that imports nats or trio_asyncio.

nats-py is asyncio; it runs on trio-asyncio's loop, opened by `open_bus` and owned by
whoever holds the context manager. Messages cross into trio through nats-py callbacks
that only do synchronous work (the handler given to `Bus.subscription`), never by
iterating a subscription through the bridge (about ten times slower, docs/findings.md).

nats-py 2.16 has a bug that silently stops all delivery when a pending ``flush()``
future is cancelled. This module never cancels one: confirmation that a SUB is live
is a PING whose PONG future we create, never cancel, and only *watch* from trio (a
done-callback sets a trio Event). A waiter that goes away just stops watching. A
watchdog reconnects if the client's read task dies anyway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nats
import nats.errors
import trio
import trio_asyncio

from app.errors import BusUnavailable

log = logging.getLogger("chatwatch.nats")

MessageHandler = Callable[[str, bytes, "dict[str, str] | None"], None]
StatusListener = Callable[[bool], None]

_DRAIN_DEADLINE = 2.0
_APPLY_DEADLINE = 10.0
_WATCHDOG_PERIOD = 1.0


class ConnectionClosedForGood(Exception):
    """Raised by `open_bus` when nats-py closed the connection and will not reconnect."""


class _DirectDelivery:
    """Stands in for a nats-py subscription's pending queue: delivers inline.

    nats-py's read loop hands each message to ``sub._pending_queue.put_nowait``; by
    default that is an asyncio.Queue drained by one asyncio task per subscription
    (or an iterator), a queue hop and a task switch per message, and a task per
    conversation. Here ``put_nowait`` calls the handler at once, in the read loop,
    in order. The handler only does non-blocking work (`Hub._deliver`); whatever it
    raises is logged, never allowed into nats-py's read loop.
    """

    __slots__ = ("_handler", "_sub")

    def __init__(self, sub: Any, handler: MessageHandler) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Any) -> None:
        data = msg.data
        self._sub._pending_size -= len(data)
        try:
            self._handler(msg.subject, data, msg.headers)
        except Exception:
            log.exception("message handler failed for %s", msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        return None


class _SubRequest:
    """A subscription asked for by a topic; filled in by the bus's manager task."""

    __slots__ = (
        "cancelled",
        "confirmed",
        "error",
        "handler",
        "pong",
        "ready",
        "released",
        "sub",
        "subject",
    )

    def __init__(self, subject: str, handler: MessageHandler) -> None:
        self.subject = subject
        self.handler = handler
        self.ready = trio.Event()
        self.sub: Any = None
        self.error: Exception | None = None
        self.pong: Any = None
        self.confirmed: trio.Event | None = None
        self.cancelled = False
        self.released = False


class Bus:
    """One NATS connection for the whole process, reconnecting forever.

    `connected` is the state as last reported by nats-py; listeners registered with
    `add_status_listener` are called synchronously (on the trio thread) on each change.
    """

    def __init__(self, urls: Sequence[str], loop: Any) -> None:
        self._urls = list(urls)
        self._loop = loop
        self._nc: Any = None
        self.connected = False
        self._changed = trio.Event()
        self._listeners: list[StatusListener] = []
        self._pong_waiters: set[trio.Event] = set()
        self._pending_subs: list[_SubRequest] = []
        self._pending_unsubs: list[Any] = []
        self._work = trio.Event()
        self._closing = False
        self._closed_for_good = trio.Event()
        self.reconnects = 0

    # -- state ---------------------------------------------------------------

    def add_status_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def _set_connected(self, value: bool) -> None:
        if value == self.connected:
            return
        self.connected = value
        for waiter in self._pong_waiters:
            waiter.set()
        if value:
            self._work.set()  # subscriptions that waited for the connection
        self._changed.set()
        self._changed = trio.Event()
        for listener in self._listeners:
            try:
                listener(value)
            except Exception:
                log.exception("status listener failed")

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._changed.wait()

    # -- nats-py callbacks (run on the asyncio side, on the trio thread) -------

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS connection lost; reconnecting")
        self._set_connected(False)

    async def _on_reconnected(self) -> None:
        # nats-py has replayed every SUB and flushed before calling this.
        self.reconnects += 1
        log.warning("NATS connection restored (%s)", self._url_for_log())
        self._set_connected(True)

    async def _on_error(self, exc: Exception) -> None:
        if not self._closing:
            log.info("NATS: %s: %s", type(exc).__name__, exc)

    async def _on_closed(self) -> None:
        self._set_connected(False)
        if not self._closing:
            self._closed_for_good.set()

    def _url_for_log(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return f"{url.hostname}:{url.port}" if url is not None else "?"

    # -- bridge --------------------------------------------------------------

    async def _aio(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kw)

    # -- connection ----------------------------------------------------------

    async def _connect_forever(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        delay = 0.05
        warned = False
        while True:
            try:
                self._nc = await self._aio(
                    nats.connect,
                    servers=self._urls,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    connect_timeout=2,
                    drain_timeout=int(_DRAIN_DEADLINE),
                    # nats-py's default (120 s x 2 outstanding) takes minutes to notice
                    # a server that vanished without FIN/RST; this, about 15 s.
                    ping_interval=5,
                    max_outstanding_pings=3,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_closed,
                )
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                if not warned:
                    warned = True
                    log.warning("NATS not reachable at %s (%s); retrying", self._urls, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            log.info("NATS connected (%s)", self._url_for_log())
            self._set_connected(True)
            return

    async def _watchdog(self) -> None:
        """Reconnect if nats-py's read task died while the client says it is connected."""
        while True:
            await trio.sleep(_WATCHDOG_PERIOD)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            reader = nc._reading_task
            if reader is not None and reader.done():
                log.error("nats-py read loop died while connected; forcing a reconnect")
                await self._aio(nc._process_op_err, nats.errors.StaleConnectionError())

    async def _fail_when_closed(self) -> None:
        await self._closed_for_good.wait()
        raise ConnectionClosedForGood(
            f"NATS connection closed for good: {getattr(self._nc, 'last_error', None)!r}"
        )

    # -- operations ----------------------------------------------------------

    async def _confirm(self) -> None:
        """Return once the server has processed everything written so far."""
        await self.wait_connected()
        with trio.CancelScope(shield=True):
            pong = await self._aio(self._ping_after_pending)
        done = trio.Event()
        pong.add_done_callback(lambda _f: done.set())
        await self._await_pong(pong, done)

    async def _await_pong(self, pong: Any, done: trio.Event) -> None:
        """Wait for `pong` (whose done-callback sets `done`) without ever cancelling it.

        A waiter that is cancelled only stops watching (module docstring). If the
        connection drops first, the PONG never comes: nats-py replays every SUB on
        reconnect and flushes before `reconnected`, so being back is confirmation.
        """
        if pong.done():
            return
        self._pong_waiters.add(done)  # `_set_connected` wakes us on a disconnect
        try:
            await done.wait()
        finally:
            self._pong_waiters.discard(done)
        if not pong.done():
            await self.wait_connected()

    @asynccontextmanager
    async def subscription(
        self, subject: str, handler: MessageHandler
    ) -> AsyncGenerator[None, None]:
        """Subscribe `handler` to `subject`; entered once the server confirmed the SUB.

        `handler(subject, payload)` runs synchronously for each message, in order.
        Waits for a connection if there is none. Leaving (normally or cancelled, even
        mid-subscribe) is synchronous: the subscription is handed to the bus's own
        task, which removes it. Nothing here can be interrupted half-way, and no
        deadline can skip an UNSUB when the process is busy.
        """
        req = _SubRequest(subject, handler)
        self._pending_subs.append(req)
        self._work.set()
        try:
            await req.ready.wait()
            if req.error is not None:
                raise req.error
            await self._wait_confirmed(req)
            yield
        finally:
            req.cancelled = True
            self._release(req)

    def _release(self, req: _SubRequest) -> None:
        if req.sub is not None and not req.released:
            req.released = True
            self._pending_unsubs.append(req.sub)
            self._work.set()

    async def _wait_confirmed(self, req: _SubRequest) -> None:
        if req.pong is not None and req.confirmed is not None:
            await self._await_pong(req.pong, req.confirmed)

    async def _manage_subscriptions(self) -> None:
        """The one task that talks SUB/UNSUB to nats-py, in batches.

        Batching turns a thousand arrivals (or departures) into one bridge call and
        one PING, instead of a thousand of each.
        """
        while True:
            await self._work.wait()
            self._work = trio.Event()
            unsubs, self._pending_unsubs = self._pending_unsubs, []
            pending = [r for r in self._pending_subs if not r.cancelled]
            if self.connected:
                subs, self._pending_subs = pending, []
            else:
                subs, self._pending_subs = [], pending
            if not subs and not unsubs:
                continue
            confirmed = trio.Event()
            # Shielded (a half-applied batch would lose handles) but bounded: nats-py
            # can block here only if its write queue is stuck, and shutdown must not.
            pong = None
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + _APPLY_DEADLINE
            ) as scope:
                pong = await self._aio(self._apply, subs, unsubs)
            if scope.cancelled_caught:
                log.error(
                    "nats-py did not take %d SUB / %d UNSUB within %.0f s",
                    len(subs),
                    len(unsubs),
                    _APPLY_DEADLINE,
                )
                for req in subs:
                    req.error = BusUnavailable("NATS did not take the subscription")
            if pong is not None:
                pong.add_done_callback(lambda _f, ev=confirmed: ev.set())
            for req in subs:
                req.pong, req.confirmed = pong, confirmed
                req.ready.set()
                if req.cancelled:
                    self._release(req)

    async def _apply(self, subs: list[_SubRequest], unsubs: list[Any]) -> Any:
        """Asyncio side of `_manage_subscriptions`: UNSUBs, SUBs, then one PING."""
        for sub in unsubs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.info("unsubscribe %s: %s", sub.subject, exc)
        if not subs:
            return None
        for req in subs:
            try:
                req.sub = await self._nc.subscribe(req.subject)
                req.sub._pending_queue = _DirectDelivery(req.sub, req.handler)
            except nats.errors.Error as exc:
                req.error = exc
        return await self._ping_after_pending()

    async def _ping_after_pending(self) -> Any:
        """Asyncio side: send a PING behind everything queued; return its PONG future.

        nats-py queues SUB and PUB in `_pending` for its flusher task but writes PING
        straight to the transport, so its PING can overtake the commands it should
        confirm (seen: `:ok` sent before the SUB reached the server, and an event
        published right after it lost). Write the pending commands first, with no
        await in between, exactly as nats-py's flusher does. Not connected: the PONG
        never comes; nats-py replays SUBs on reconnect and flushes before
        `reconnected`, which the waiters take instead.
        """
        nc = self._nc
        pong = self._loop.create_future()
        if nc.is_connected:
            if nc._pending_data_size > 0:
                nc._transport.writelines(nc._pending[:])
                nc._pending = []
                nc._pending_data_size = 0
            await nc._send_ping(pong)
        return pong

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``fn(nc, *args)`` on the asyncio side with the live client (JetStream API).

        Raises:
            BusUnavailable: not connected.
        """
        nc = self._nc
        if nc is None or not self.connected:
            raise BusUnavailable("NATS not connected")
        try:
            return await self._aio(fn, nc, *args)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"NATS: {type(exc).__name__}: {exc}") from exc

    async def publish(self, subject: str, payload: bytes) -> None:
        await self.wait_connected()
        await self._aio(self._nc.publish, subject, payload)

    async def flush(self) -> None:
        """Wait until everything published so far reached the server (never cancels)."""
        await self._confirm()

    async def close(self) -> None:
        """Drain (UNSUB, flush pending publishes) then close; shielded with a deadline."""
        self._closing = True
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_DRAIN_DEADLINE):
                try:
                    if nc.is_connected:
                        await self._aio(nc.drain)
                except (TimeoutError, nats.errors.Error, OSError) as exc:
                    log.info("NATS drain: %s", exc)
            with trio.move_on_after(_DRAIN_DEADLINE):
                if not nc.is_closed:
                    await self._aio(nc.close)


@asynccontextmanager
async def open_bus(urls: Sequence[str]) -> AsyncGenerator[Bus, None]:
    """Open the trio-asyncio loop and one NATS connection that reconnects forever.

    Returns at once: the connection is made in the background (`Bus.connected` tells,
    listeners are told). Raises ConnectionClosedForGood if nats-py gives up for good
    (e.g. authorization revoked): serving dead streams would be worse than exiting.
    """
    async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
        bus = Bus(urls, loop)
        await nursery.start(bus._connect_forever)
        nursery.start_soon(bus._watchdog)
        nursery.start_soon(bus._manage_subscriptions)
        nursery.start_soon(bus._fail_when_closed)
        try:
            yield bus
        finally:
            await bus.close()
            nursery.cancel_scope.cancel()


async def publish_once(urls: Sequence[str], subject: str, payload: bytes, patience: float) -> None:
    """Connect, publish one message, confirm it reached the server, disconnect.

    Raises:
        BusUnavailable: no server answered within `patience` seconds.
    """
    async with open_bus(urls) as bus:
        with trio.move_on_after(patience) as scope:
            await bus.publish(subject, payload)
            await bus.flush()
        if scope.cancelled_caught:
            raise BusUnavailable(f"NATS at {','.join(urls)} did not answer within {patience}s")
