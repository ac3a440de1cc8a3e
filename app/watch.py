"""The body of one SSE response: a nursery that feeds the watcher's channel, drained.

Quart drives a response body as ``async with body as it: async for data in it: send``,
all in one task. `WatchBody` opens the watcher's admission nursery in ``__aenter__``
and closes it in that task too: at the first drain step after the admission has
finished, or in ``__aexit__``, so the nursery brackets part of the drain loop in that
one task: nothing is ever yielded from inside a cancel scope (trio#638), and a client
disconnect, which cancels the request's nursery (app/asgiconn.py), cancels this one
with it.
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


class WatchBody(ResponseBody):
    """Streams one watcher; the hub forgets it when the body is closed, however.

    What it holds for a whole stream is kept small (an idle watcher is mostly this
    and the connection): no exit stack (its callbacks cost more than the body), and
    the admission nursery is closed as soon as the admission is over rather than
    when the stream ends (docs/findings.md, "What an idle watcher holds").
    """

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
        # Whether `__aexit__` owes the hub a `leave` (set once the watcher is in it).
        self._joined = False
        # The admission's nursery, open from `__aenter__` until the admission is over.
        self._admission: AbstractAsyncContextManager[trio.Nursery] | None = None
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
        # The slot is released in `__aexit__`; the request releases it too if the body
        # never gets this far (see http._ReleaseSlots). Release is idempotent.
        if self._hub.closed:
            self._ended = True
            return self
        if self._watcher is None:
            self._watcher = self._hub.join(self._conversation_id, self._owner, self._resume)
            self._resume = None  # the watcher has it
        self._joined = True
        admission = trio.open_nursery()
        try:
            nursery = await admission.__aenter__()
        except BaseException:
            self._release()
            raise
        self._admission, self._nursery = admission, nursery
        # What feeds the channel besides the hub's fan-out: the admission (NATS status,
        # waiting for the subscription, `:ok`, and with history on the replay: it runs
        # here, in this watcher's nursery, never in the hub). Keepalives and NATS status
        # changes come from the hub's own tasks, one for all watchers.
        nursery.start_soon(self._hub.admit, self._watcher)
        return self

    async def _end_admission(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the admission's nursery (cancelling the admission if it still runs).

        In the task that opened it, and never from inside another cancel scope opened
        after it: it is either the body's own drain step (`__anext__`, called directly
        by the loop that `async with body` brackets) or `__aexit__`.
        """
        admission, nursery = self._admission, self._nursery
        if admission is None or nursery is None:
            return
        self._admission = self._nursery = None
        # Cancelling a scope walks its tasks and children; once admission is over the
        # nursery is empty and there is nothing to cancel (measured: a quarter of the
        # cost of a disconnect went here).
        if nursery.child_tasks:
            nursery.cancel_scope.cancel()
        single: BaseException | None = None
        try:
            await admission.__aexit__(exc_type, exc_value, tb)
        except BaseExceptionGroup as group:
            single = unwrap_single(group)
        finally:
            # No local may still name the exception that came in when `single` (often
            # that very Cancelled) is raised from this frame: the frame joins its
            # traceback, and the cycle would hold the whole connection (request,
            # hypercorn's objects, trio's tasks) until a full garbage collection. Under
            # churn those collections stalled the process for up to 1.8 s
            # (tests/test_garbage.py).
            del exc_value, tb
        if single is None:
            return
        # Raised outside the `except`: raising inside it would link the exception to
        # the group that contains it (the same kind of cycle).
        try:
            raise single
        finally:
            del single

    def disconnected(self) -> None:
        """The client went away (sync; `asgiconn.Disconnectable`): leave the hub now.

        Called by the request handling (`asgiconn._Messages`) in the step that hands
        over the disconnect, after it cancelled the request: the last watcher of a conversation
        ends its subscription (UNSUB written) here, not a scheduler pass later when
        the cancellation reaches `__aexit__` (which then finds nothing left to do).
        """
        self._release()

    def _release(self) -> None:
        if self._joined and self._watcher is not None:
            self._joined = False
            self._hub.leave(self._watcher)
        if self._slot is not None:
            self._slot.release()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._end_admission(exc_type, exc_value, tb)
        finally:
            del exc_value, tb  # as in _end_admission: this frame names no exception
            self._release()

    def __aiter__(self) -> WatchBody:
        return self

    async def __anext__(self) -> bytes:
        watcher = self._watcher
        if watcher is None:
            raise StopAsyncIteration
        if self._nursery is not None and not self._nursery.child_tasks:
            # The admission is over: its nursery goes now, not at the end of the stream.
            await self._end_admission(None, None, None)
        try:
            return await watcher.outbox.take(_COALESCE_BYTES)
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if watcher.overflowed and not self._ended:
                self._ended = True
                return SLOW_CONSUMER
            raise StopAsyncIteration from None
