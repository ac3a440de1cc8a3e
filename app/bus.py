"""The NATS connection: one per process, reconnecting forever, with a watchdog.

nats-py is asyncio; it runs on trio-asyncio's loop, opened by `open_bus` and owned by
whoever holds the context manager. Messages cross into trio through nats-py callbacks
that only do synchronous work (the handler given to `Bus.subscription`), never by
iterating a subscription through the bridge (about ten times slower, docs/findings.md).

nats-py 2.16 has a bug that silently stops all delivery when a pending ``flush()``
future is cancelled. No PONG future is ever cancelled here: confirmation is a PING
whose PONG future we create and only *watch* from trio (`Bus.await_pong`); a waiter
that goes away just stops watching. A watchdog reconnects if the read task dies anyway.

Roles: this module (connection, status, watchdog, the public `Bus`); `subscriptions`
(SUB batches, synchronous UNSUBs); `natsborder` (every use of nats-py's private API); `publish`
(the one-shot publisher of ``chatwatch publish``). Those four are the only importers
of nats and trio_asyncio.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import nats.errors
import trio
import trio_asyncio
from nats.aio.client import Client

from app import natsborder
from app.errors import BusUnavailable
from app.natsborder import Handler
from app.subscriptions import Release, SubscriptionManager

log = logging.getLogger("chatwatch.nats")

T = TypeVar("T")
MessageHandler = Handler
StatusListener = Callable[[bool], None]

# nats-py's drain() waits this long for the subscriptions, then flushes (with its own
# default flush timeout). trio must outlast both, or it cancels that final flush.
_DRAIN_TIMEOUT = 2
_CLOSE_DEADLINE = _DRAIN_TIMEOUT + natsborder.FINAL_FLUSH_TIMEOUT + 1.0
_WATCHDOG_PERIOD = 1.0
# Reconnect attempts back off from the first to the last wait; failures are logged
# at WARNING once, then once per interval with the count.
_RECONNECT_WAIT_FIRST = 0.25
_RECONNECT_WAIT_MAX = 2.0
_RETRY_LOG_INTERVAL = 30.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ConnectionClosedForGood(Exception):
    """Raised by `open_bus` when nats-py closed the connection and will not reconnect."""


class RetryLog:
    """Connection failures: one WARNING at the first, then one per `interval` seconds
    saying how many there were, instead of a line per attempt (nats-py reports each)."""

    def __init__(self, interval: float = _RETRY_LOG_INTERVAL) -> None:
        self._interval = interval
        self._next: float | None = None
        self._count = 0

    def failed(self, what: str, now: float) -> None:
        self._count += 1
        if self._next is None:
            log.warning("%s; retrying", what)
        elif now >= self._next:
            log.warning("%s (%d failed attempts so far); retrying", what, self._count)
        else:
            return
        self._next = now + self._interval

    def succeeded(self) -> None:
        self._next = None
        self._count = 0


class Bus:
    """One NATS connection for the whole process, reconnecting forever.

    `connected` is the state as last reported by nats-py; listeners registered with
    `add_status_listener` are called synchronously (on the trio thread) on each
    change, with True on every reconnect. `reconnects` counts reconnects,
    `disconnects` connection losses (the epoch a PONG belongs to).
    """

    def __init__(self, urls: Sequence[str], loop: Any) -> None:
        self._urls = list(urls)
        self._loop = loop
        self._nc: Any = None
        self.connected = False
        self._changed = trio.Event()
        self._listeners: list[StatusListener] = []
        self._wakeups: set[trio.Event] = set()
        self._closing = False
        self._closed_for_good = trio.Event()
        self._retry_log = RetryLog()
        self.reconnects = 0
        self.disconnects = 0
        self._ever_connected = False
        self._subscriptions = SubscriptionManager(self)

    @property
    def nc(self) -> Any:
        """The nats-py client (None before the first connection)."""
        return self._nc

    @property
    def loop(self) -> Any:
        return self._loop

    @property
    def batches(self) -> int:
        """SUB batches handed to nats-py so far."""
        return self._subscriptions.batches

    @property
    def unsubscribes(self) -> int:
        """UNSUBs handed to nats-py so far (each written in the step that left)."""
        return self._subscriptions.unsubscribes

    # -- state ---------------------------------------------------------------

    def add_status_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def _set_connected(self, value: bool) -> None:
        if value == self.connected:
            return
        self.connected = value
        if not value:
            self.disconnects += 1
        for wake in self._wakeups:
            wake.set()
        if value:
            self._subscriptions.wake()  # subscriptions that waited for the connection
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
        self._retry_log.succeeded()
        natsborder.set_reconnect_wait(self._nc, _RECONNECT_WAIT_FIRST)
        log.warning("NATS connection restored (%s)", self._url_for_log())
        self._set_connected(True)

    async def _on_error(self, exc: Exception) -> None:
        if self._closing:
            return
        if not self.connected and self._nc is not None:
            # Called once per failed attempt, first connection or reconnection: back
            # off, and say it once in a while.
            wait = natsborder.reconnect_wait(self._nc)
            natsborder.set_reconnect_wait(self._nc, min(wait * 2, _RECONNECT_WAIT_MAX))
            self._retry_log.failed(
                f"NATS at {','.join(self._urls)} not reachable: {_describe(exc)}",
                trio.current_time(),
            )
        else:
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

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(nc, *args)`` on the asyncio side with the live nats-py client.

        For JetStream API calls (``nc.jetstream().get_msg(...)``) and other requests.
        A trio cancellation cancels the asyncio task, which is safe for requests:
        nats-py drops a cancelled request's reply future from its table and ignores
        a late reply. Never pass something that awaits ``nc.flush()`` (a cancelled
        flush stops all delivery in nats-py 2.16); use `flush` instead.

        Raises:
            BusUnavailable: not connected to NATS (nothing is attempted).
        """
        if not self.connected or self._nc is None:
            raise BusUnavailable("NATS not connected")
        try:
            result: T = await self._aio(fn, self._nc, *args)
        except nats.errors.Error as exc:
            # A request that timed out or met a closing connection: NATS, not the caller.
            raise BusUnavailable(f"NATS: {type(exc).__name__}: {exc}") from exc
        return result

    # -- connection ----------------------------------------------------------

    async def _connect_forever(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        delay = 0.05
        while True:
            # Our own client object, so that its retries (nats-py retries the first
            # connection too, calling error_cb each time) can be slowed down.
            self._nc = Client()
            try:
                await self._aio(
                    self._nc.connect,
                    servers=self._urls,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=_RECONNECT_WAIT_FIRST,
                    connect_timeout=2,
                    drain_timeout=_DRAIN_TIMEOUT,
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
                self._retry_log.failed(
                    f"NATS at {','.join(self._urls)} not reachable: {_describe(exc)}",
                    trio.current_time(),
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._ever_connected = True
            self._retry_log.succeeded()
            natsborder.set_reconnect_wait(self._nc, _RECONNECT_WAIT_FIRST)
            log.info("NATS connected (%s)", self._url_for_log())
            self._set_connected(True)
            return

    async def _watchdog(self) -> None:
        """Reconnect if nats-py's read task died while the client says it is connected."""
        while True:
            await trio.sleep(_WATCHDOG_PERIOD)
            nc = self._nc
            if nc is not None and natsborder.read_loop_died(nc):
                log.error("nats-py read loop died while connected; forcing a reconnect")
                await self._aio(natsborder.force_reconnect, nc)

    async def _fail_when_closed(self) -> None:
        await self._closed_for_good.wait()
        raise ConnectionClosedForGood(
            f"NATS connection closed for good: {getattr(self._nc, 'last_error', None)!r}"
        )

    # -- confirmation --------------------------------------------------------

    async def await_pong(self, pong: Any, epoch: int) -> None:
        """Wait for `pong` (sent in connection epoch `epoch`) without cancelling it.

        Each waiter has its own wake-up, so one that leaves strands no other. If the
        connection drops first, the PONG never comes: nats-py replays every SUB on
        reconnect and flushes before `reconnected`, so being back is confirmation.
        """
        while not pong.done():
            if self.disconnects != epoch:
                await self.wait_connected()
                return
            wake = trio.Event()

            def on_done(_f: Any, wake: trio.Event = wake) -> None:
                wake.set()

            pong.add_done_callback(on_done)
            self._wakeups.add(wake)
            try:
                await wake.wait()
            finally:
                self._wakeups.discard(wake)
                pong.remove_done_callback(on_done)

    async def _ping(self) -> tuple[Any, int]:
        epoch = self.disconnects
        return await natsborder.ping_after_pending(self._nc, self._loop), epoch

    # -- operations ----------------------------------------------------------

    @asynccontextmanager
    async def subscription(self, subject: str, handler: Handler) -> AsyncGenerator[Release, None]:
        """Subscribe `handler` to `subject`; entered once the server confirmed the SUB.

        ``handler(subject, payload, headers)`` runs synchronously for each message, in
        order (``headers``: nats-py's ``msg.headers``, a dict or None). Waits for a
        connection if there is none. Leaving (normally or cancelled) is synchronous:
        the UNSUB is written in that step; one left mid-subscribe is unsubscribed by
        the bus's own task as soon as its SUB went out. No deadline can skip an UNSUB.
        What it yields ends the subscription the same way, earlier (sync,
        idempotent): for an owner that knows it is done before its task unwinds.

        Raises:
            BusUnavailable: NATS did not take the subscription in time.
            nats.errors.Error: nats-py refused it (e.g. a bad subject).
        """
        async with self._subscriptions.subscription(subject, handler) as release:
            yield release

    async def publish(self, subject: str, payload: bytes) -> None:
        await self.wait_connected()
        await self._aio(self._nc.publish, subject, payload)

    async def flush(self) -> None:
        """Wait until everything published so far reached the server (never cancels)."""
        await self.wait_connected()
        # Bounded shield: the call only writes (it blocks only on a stuck write queue),
        # and cancelling it half-way would leave no PONG to watch.
        ping: tuple[Any, int] | None = None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_DEADLINE):
            ping = await self._aio(self._ping)
        if ping is None:
            raise BusUnavailable("NATS did not take a PING")
        await self.await_pong(*ping)

    async def close(self) -> None:
        """Drain (UNSUB, flush pending publishes) then close; shielded with a deadline
        that outlasts nats-py's own drain timeout and final flush."""
        self._closing = True
        nc = self._nc
        if nc is None or nc.is_closed or not self._ever_connected:
            return  # (a first connection still being tried is cancelled by open_bus)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_DEADLINE):
                try:
                    if nc.is_connected:
                        await self._aio(nc.drain)
                except (TimeoutError, nats.errors.Error, OSError) as exc:
                    log.info("NATS drain: %s", exc)
            with trio.move_on_after(_CLOSE_DEADLINE):
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
        nursery.start_soon(bus._subscriptions.run)
        nursery.start_soon(bus._fail_when_closed)
        try:
            yield bus
        finally:
            await bus.close()
            nursery.cancel_scope.cancel()
