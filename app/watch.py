"""The body of one SSE response: a nursery that feeds the watcher's channel, drained.

Quart drives a response body as ``async with body as it: async for data in it: send``,
all in one task. `WatchBody` opens the watcher's nursery in ``__aenter__`` and closes
it in ``__aexit__``, so the nursery brackets the whole drain loop in that one task:
nothing is ever yielded from inside a cancel scope (trio#638), and a client
disconnect, which cancels quart-trio's request nursery, cancels this one with it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType

import trio
from quart.wrappers.response import ResponseBody

from app.errors import unwrap_single
from app.hub import SLOW_CONSUMER, Hub, Resume, Watcher
from app.limits import Slot

# Frames already queued for a watcher are written together, up to this many bytes.
_COALESCE_BYTES = 256 * 1024


def _cancel_if_busy(nursery: trio.Nursery) -> None:
    # Cancelling a scope walks its tasks and children; once admission is over the
    # nursery is empty and there is nothing to cancel (measured: a quarter of the
    # cost of a disconnect went here).
    if nursery.child_tasks:
        nursery.cancel_scope.cancel()


class WatchBody(ResponseBody):
    """Streams one watcher; the hub forgets it when the body is closed, however."""

    def __init__(
        self,
        hub: Hub,
        conversation_id: str,
        owner: str | None,
        resume: Resume | None = None,
        slot: Slot | None = None,
    ) -> None:
        self._hub = hub
        self._conversation_id = conversation_id
        self._owner = owner
        self._resume = resume
        self._slot = slot
        self._watcher: Watcher | None = None
        # The watcher's nursery, entered and exited by hand (see __aexit__).
        self._manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._ended = False

    @classmethod
    def for_watcher(cls, hub: Hub, watcher: Watcher) -> WatchBody:
        """A body around an already joined watcher (unit tests of the drain loop)."""
        body = cls(hub, watcher.topic.conversation_id, watcher.owner)
        body._watcher = watcher
        return body

    async def __aenter__(self) -> WatchBody:
        # Joining here, not in the route, pairs `join` with `leave` in one place with
        # no checkpoint between them: a client that hangs up while the response head
        # is being sent can never leave a watcher (and its subscription) behind.
        if self._hub.closed:
            self._ended = True
            self._close()
            return self
        if self._watcher is None:
            self._watcher = self._hub.join(self._conversation_id, self._owner, self._resume)
        manager = trio.open_nursery()
        try:
            nursery = await manager.__aenter__()
        except BaseException:
            self._close()
            raise
        self._manager, self._nursery = manager, nursery
        # What feeds the channel besides the hub's fan-out: the admission (NATS status,
        # waiting for the subscription, `:ok`, and with history on the replay: it runs
        # here, in this watcher's nursery, never in the hub). Keepalives and NATS status
        # changes come from the hub's own tasks, one for all watchers.
        nursery.start_soon(self._hub.admit, self._watcher)
        return self

    def _close(self) -> None:
        """Leave the hub and give the admission slot back (both idempotent)."""
        if self._watcher is not None:
            self._hub.leave(self._watcher)
        if self._slot is not None:
            # The request releases it too if the body never got this far (see
            # http._ReleaseSlots).
            self._slot.release()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # No AsyncExitStack here, and no local left naming an exception when one is
        # raised: every frame an exception passes through joins its traceback, and a
        # frame that still refers to the exception (contextlib's __aexit__ keeps the
        # group it re-raises in a local) makes a reference cycle that holds the whole
        # connection (request, hypercorn's objects, trio's tasks) until a full garbage
        # collection. Under churn those collections took up to 1.8 s and stalled every
        # stream (measured: about 160 objects of cyclic garbage per cancelled stream).
        manager, nursery = self._manager, self._nursery
        self._manager = self._nursery = None
        try:
            if manager is not None and nursery is not None:
                _cancel_if_busy(nursery)
                await manager.__aexit__(exc_type, exc_value, tb)
        except BaseExceptionGroup as group:
            single = unwrap_single(group)
        else:
            return
        finally:
            del exc_value, tb
            self._close()
        # Raised outside the `except`: raising inside it would link the exception to
        # the group that contains it.
        try:
            raise single
        finally:
            del single

    def __aiter__(self) -> WatchBody:
        return self

    async def __anext__(self) -> bytes:
        watcher = self._watcher
        if watcher is None:
            raise StopAsyncIteration
        try:
            return await watcher.outbox.take(_COALESCE_BYTES)
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if watcher.overflowed and not self._ended:
                self._ended = True
                return SLOW_CONSUMER
            raise StopAsyncIteration from None
