"""SUB/UNSUB through one bus-owned task, in batches, each confirmed by one PING.

Batching turns a thousand arrivals (or departures) into one bridge call and one
PING instead of a thousand of each. A batch runs as one asyncio task that nothing
ever cancels: a batch cut half-way would lose UNSUBs (subscriptions left on the
server) or leave a SUB in nats-py's table (replayed on every reconnect) with no
handle to remove it. A batch that overruns its deadline fails its SUB requests at
once (their watchers are told); when it does finish, whatever it subscribed for
them is unsubscribed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
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
        self._pending_unsubs: list[Any] = []
        self._work = trio.Event()
        self.batches = 0  # batches handed to nats-py (for tests and debugging)

    def wake(self) -> None:
        """Look at the queues again (the connection came up)."""
        self._work.set()

    @asynccontextmanager
    async def subscription(self, subject: str, handler: Handler) -> AsyncGenerator[None, None]:
        """See `bus.Bus.subscription`."""
        req = _SubRequest(subject, handler)
        self._pending_subs.append(req)
        self._work.set()
        try:
            await req.ready.wait()
            if req.error is not None:
                raise req.error
            await self._link.await_pong(req.pong, req.epoch)
            yield
        finally:
            req.cancelled = True
            self._release(req)

    def _release(self, req: _SubRequest) -> None:
        if req.sub is not None and not req.released:
            req.released = True
            self._pending_unsubs.append(req.sub)
            self._work.set()

    async def run(self) -> NoReturn:
        """The one task that talks SUB/UNSUB to nats-py."""
        while True:
            await self._work.wait()
            self._work = trio.Event()
            unsubs, self._pending_unsubs = self._pending_unsubs, []
            pending = [r for r in self._pending_subs if not r.cancelled]
            if self._link.connected:
                subs, self._pending_subs = pending, []
            else:
                subs, self._pending_subs = [], pending
            if subs or unsubs:
                self.batches += 1
                await self._run_batch(subs, unsubs)

    async def _run_batch(self, subs: list[_SubRequest], unsubs: list[Any]) -> None:
        # Not awaited through aio_as_trio, which would cancel it with us; the loop
        # owns it, and we wait for its end (unshielded: shutdown is never held).
        task = asyncio.ensure_future(self._apply(subs, unsubs), loop=self._link.loop)
        finished = trio.Event()
        task.add_done_callback(lambda _t: finished.set())
        with trio.move_on_after(_APPLY_DEADLINE) as late:
            await finished.wait()
        if late.cancelled_caught:
            log.error(
                "nats-py did not take %d SUB / %d UNSUB within %.0f s",
                len(subs),
                len(unsubs),
                _APPLY_DEADLINE,
            )
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
            log.error("SUB/UNSUB batch failed", exc_info=exc)
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

    async def _apply(self, subs: list[_SubRequest], unsubs: list[Any]) -> tuple[Any, int]:
        """Asyncio side: UNSUBs, SUBs, then one PING; its PONG future and the epoch."""
        nc = self._link.nc
        for sub in unsubs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.info("unsubscribe %s: %s", sub.subject, exc)
        if not subs:
            return None, 0
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
