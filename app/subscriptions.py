"""SUBs through one bus-owned task, in batches, each confirmed by one PING; UNSUBs at once.

Batching turns a thousand arrivals into one bridge call and one PING instead of a
thousand of each. A batch runs as one asyncio task that nothing ever cancels: a batch
cut half-way would leave a SUB in nats-py's table (replayed on every reconnect) with
no handle to remove it. A batch that overruns its deadline fails its SUB requests at
once (their watchers are told); when it does finish, whatever it subscribed for them
is unsubscribed again.

An UNSUB needs no confirmation and no task: leaving a subscription writes it
synchronously (`natsborder.unsubscribe_now`), in the step that leaves, behind the
subscription's own SUB. It used to be queued for the batch task; when 5000 streams
close at once every trio scheduler pass lasts hundreds of milliseconds, and the hops
that queue took (the topic's task unwinding, the batch task waking, the asyncio task
starting, nats-py's flusher waking) cost a pass each: the server saw the last UNSUB
seconds after the last client left (docs/findings.md, "Subscriptions gone after
close"). Nothing can cut a synchronous UNSUB half-way, and a subscription whose SUB
is still in a batch is unsubscribed by the batch task when that batch ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, Protocol

import nats.errors
import trio

from app import natsborder
from app.errors import BusUnavailable
from app.natsborder import Handler

log = logging.getLogger("chatwatch.nats")

# How long watchers wait for nats-py to take a batch before their subscriptions
# fail; nats-py blocks here only if its write queue is stuck.
_APPLY_DEADLINE = 10.0

# Ends a subscription at once (sync, idempotent): what `subscription` yields.
Release = Callable[[], None]


class Link(Protocol):
    """What the manager needs from the connection (`bus.Bus`)."""

    connected: bool
    disconnects: int

    @property
    def nc(self) -> Any: ...

    @property
    def loop(self) -> Any: ...

    async def await_pong(self, pong: Any, epoch: int) -> None: ...


class _SubRequest:
    """A subscription asked for by a topic; filled in by the manager's batches."""

    __slots__ = (
        "cancelled",
        "epoch",
        "error",
        "handler",
        "pong",
        "ready",
        "released",
        "sub",
        "subject",
    )

    def __init__(self, subject: str, handler: Handler) -> None:
        self.handler = handler
        self.ready = trio.Event()
        self.sub: Any = None
        self.error: Exception | None = None
        self.pong: Any = None
        self.epoch = 0
        self.cancelled = False
        self.released = False
        self.subject = subject


def _report_handler_error(subject: str) -> None:
    log.exception("message handler failed for %s", subject)


class SubscriptionManager:
    def __init__(self, link: Link) -> None:
        self._link = link
        self._pending_subs: list[_SubRequest] = []
        self._work = trio.Event()
        self.batches = 0  # SUB batches handed to nats-py (for tests and debugging)
        self.unsubscribes = 0  # UNSUBs handed to nats-py (for tests and debugging)

    def wake(self) -> None:
        """Look at the queues again (the connection came up)."""
        self._work.set()

    @asynccontextmanager
    async def subscription(self, subject: str, handler: Handler) -> AsyncGenerator[Release, None]:
        """See `bus.Bus.subscription`."""
        req = _SubRequest(subject, handler)
        self._pending_subs.append(req)
        self._work.set()
        try:
            await req.ready.wait()
            if req.error is not None:
                raise req.error
            await self._link.await_pong(req.pong, req.epoch)
            yield lambda: self._leave(req)
        finally:
            self._leave(req)

    def _leave(self, req: _SubRequest) -> None:
        req.cancelled = True
        self._release(req)

    def _release(self, req: _SubRequest) -> None:
        if req.sub is not None and not req.released:
            req.released = True
            self.unsubscribes += 1
            try:
                natsborder.unsubscribe_now(self._link.nc, req.sub)
            except nats.errors.Error as exc:
                # Closed or draining (drain unsubscribes everything itself).
                log.info("unsubscribe %s: %s", req.subject, exc)

    async def run(self) -> NoReturn:
        """The one task that sends SUBs to nats-py."""
        while True:
            await self._work.wait()
            self._work = trio.Event()
            pending = [r for r in self._pending_subs if not r.cancelled]
            if self._link.connected:
                subs, self._pending_subs = pending, []
            else:
                subs, self._pending_subs = [], pending
            if subs:
                self.batches += 1
                await self._run_batch(subs)

    async def _run_batch(self, subs: list[_SubRequest]) -> None:
        # Not awaited through aio_as_trio, which would cancel it with us; the loop
        # owns it, and we wait for its end (unshielded: shutdown is never held).
        task = asyncio.ensure_future(self._apply(subs), loop=self._link.loop)
        finished = trio.Event()
        task.add_done_callback(lambda _t: finished.set())
        with trio.move_on_after(_APPLY_DEADLINE) as late:
            await finished.wait()
        if late.cancelled_caught:
            log.error("nats-py did not take %d SUB within %.0f s", len(subs), _APPLY_DEADLINE)
            for req in subs:
                if req.error is None:
                    req.error = BusUnavailable("NATS did not take the subscription")
                req.ready.set()
            await finished.wait()
        pong: Any = None
        epoch = 0
        failure: Exception = BusUnavailable("NATS did not take the subscription")
        if task.cancelled():
            failure = BusUnavailable("NATS subscription batch cancelled")
        elif (exc := task.exception()) is not None:
            log.error("SUB batch failed", exc_info=exc)
            failure = BusUnavailable(f"NATS subscription failed: {exc}")
        else:
            pong, epoch = task.result()
        for req in subs:
            if pong is None and req.error is None:
                req.error = failure
            req.pong, req.epoch = pong, epoch
            req.ready.set()
            if req.cancelled or req.error is not None:
                self._release(req)

    async def _apply(self, subs: list[_SubRequest]) -> tuple[Any, int]:
        """Asyncio side: SUBs, then one PING; its PONG future and the epoch."""
        nc = self._link.nc
        for req in subs:
            try:
                req.sub = await nc.subscribe(req.subject)
            except nats.errors.Error as exc:
                req.error = exc
                continue
            natsborder.deliver_inline(req.sub, req.handler, _report_handler_error)
        # Read before the PING goes out: a disconnect after it bumps the epoch, and
        # the waiters take the reconnect (which replays every SUB) as confirmation.
        epoch = self._link.disconnects
        return await natsborder.ping_after_pending(nc, self._link.loop), epoch
