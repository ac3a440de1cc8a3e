"""hypercorn's per-request ASGI receive side, without a trio memory channel, and able
to hand its messages straight to the app instead of through a reading task.

hypercorn's trio worker gives every request (`TaskGroup.spawn_app`) a trio memory
channel: hypercorn puts the request's body and its ``http.disconnect`` into it, the
app's ``receive`` takes them out. A memory channel is about 2 KB (its state, two
channel objects, a deque, per-task tables), and a request handler that must notice a
disconnect while it streams needs a task parked on ``receive`` for the whole stream:
quart-trio's reader, another 2 KB or so with its nursery (docs/findings.md, "What an
idle watcher holds"). `Inbox` replaces the channel:

- as a channel, it is a small bounded queue (``max_app_queue_size``, at least 1)
  with the same order and the same checkpoints as trio's: ``put`` and ``receive``
  are checkpoints, a ``put`` waits while the queue is full, a ``receive`` while it
  is empty, and a cancelled one delivers nothing;
- or, once the app calls ``listen(callback)``, every message goes to the callback
  synchronously from ``put`` (what was queued first, first): the app's request
  handling (app/asgiconn.py) appends the body and cancels its scope on
  ``http.disconnect`` with no task of its own.

And the request's task runs a copy of hypercorn's `_handle` on the ASGI app itself
where hypercorn wrapped it in an `ASGIWrapper` (whose ``__call__`` only drops two
arguments): one suspended frame fewer for the life of a stream.

Why a replacement checked against a source hash, over a pinned hypercorn (as
app/fastsend.py): `spawn_app` is a private detail of hypercorn's trio worker, and
what this mirrors is its contract (a task in the connection's nursery running
``_handle`` with a receive callable, a put callable back). `install` hashes
`TaskGroup.spawn_app`, `_handle` and `ASGIWrapper.__call__`, and leaves hypercorn
alone, with a warning, when any is not the code this module was written against.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio import task_group
from hypercorn.trio.task_group import TaskGroup
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendEvent,
    Scope,
)

from app import upstream

log = logging.getLogger("chatwatch.inbox")

# sha256 of the dedented sources, in hypercorn 0.18.0, of what `_spawn_app` replaces
# and of the `_handle` it starts as the original does.
EXPECTED_SOURCE_SHA256: dict[str, str] = {
    "TaskGroup.spawn_app": "487c35772c8bd89c440732d9b5a63403895fcbb7eb3c40b9d63815d4bb6d1187",
    "_handle": "06081a56a9930825919e01e08ad2b2ffaae5508f065bcfced89cd3082db2192f",
    "ASGIWrapper.__call__": "a1afeef5c92b96de6861d8252475f1e7e7eb96897d96861a9bea31765d732f3a",
}

Listener = Callable[[ASGIReceiveEvent], None]


class Inbox:
    """One request's ASGI messages from hypercorn to the app (see the module
    docstring): a bounded queue with one reader, or a direct hand-over once the app
    listens."""

    __slots__ = ("_listener", "_max", "_messages", "_receiver", "_senders")

    def __init__(self, max_size: int) -> None:
        self._max = max(max_size, 1)
        # Small lists, not deques: a request queues one or two messages at most.
        self._messages: list[ASGIReceiveEvent] = []
        # Tasks waiting in `put` for room, in order, each with its message.
        self._senders: list[tuple[trio.lowlevel.Task, ASGIReceiveEvent]] = []
        self._receiver: trio.lowlevel.Task | None = None
        self._listener: Listener | None = None

    async def put(self, message: ASGIReceiveEvent) -> None:
        """Deliver (to the listener) or queue `message`, waiting while full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        listener = self._listener
        if listener is not None:
            listener(message)
        elif len(self._messages) < self._max and not self._senders:
            self._messages.append(message)
            receiver = self._receiver
            if receiver is not None:
                self._receiver = None
                trio.lowlevel.reschedule(receiver)
        else:
            task = trio.lowlevel.current_task()
            entry = (task, message)
            self._senders.append(entry)

            def abort(_: object) -> trio.lowlevel.Abort:
                self._senders.remove(entry)
                return trio.lowlevel.Abort.SUCCEEDED

            # Woken once the message is queued or delivered (never dropped).
            await trio.lowlevel.wait_task_rescheduled(abort)
            return
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> ASGIReceiveEvent:
        """The next message, waiting while there is none (the app's ``receive``).

        Raises:
            trio.BusyResourceError: another task is receiving, or the app listens.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._messages:
            while not self._messages:
                if self._listener is not None or self._receiver is not None:
                    raise trio.BusyResourceError("this request's messages go elsewhere")
                task = self._receiver = trio.lowlevel.current_task()

                def abort(_: object, task: trio.lowlevel.Task = task) -> trio.lowlevel.Abort:
                    if self._receiver is task:
                        self._receiver = None
                    return trio.lowlevel.Abort.SUCCEEDED

                # Woken by a `put` that queued a message (which stays queued if this
                # wait is cancelled meanwhile: nothing is lost).
                await trio.lowlevel.wait_task_rescheduled(abort)
        elif self._listener is not None:
            raise trio.BusyResourceError("this request's messages go elsewhere")
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return self._take()

    def _take(self) -> ASGIReceiveEvent:
        message = self._messages.pop(0)
        if self._senders:  # the first waiting sender's message takes the freed place
            task, waiting = self._senders.pop(0)
            self._messages.append(waiting)
            trio.lowlevel.reschedule(task)
        return message

    def listen(self, listener: Listener) -> None:
        """From now on, hand each message to `listener` as it is put, in order,
        starting with those already waiting. Synchronous: nothing can be put between
        the first of those and the last.

        Raises:
            trio.BusyResourceError: a task is receiving, or another listener listens.
        """
        if self._listener is not None or self._receiver is not None:
            raise trio.BusyResourceError("this request's messages go elsewhere")
        self._listener = listener
        messages, self._messages = self._messages, []
        senders, self._senders = self._senders, []
        for message in messages:
            listener(message)
        for task, message in senders:
            listener(message)
            trio.lowlevel.reschedule(task)


def inbox_of(receive: object) -> Inbox | None:
    """The `Inbox` behind an ASGI ``receive`` callable, if it is one's."""
    owner = getattr(receive, "__self__", None)
    return owner if type(owner) is Inbox else None


async def _spawn_app(
    self: TaskGroup,
    app: AppWrapper,
    config: Config,
    scope: Scope,
    send: Callable[[ASGISendEvent | None], Awaitable[None]],
) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
    """`TaskGroup.spawn_app` with an `Inbox` where hypercorn makes a memory channel."""
    inbox = Inbox(config.max_app_queue_size)
    assert self._nursery is not None  # spawned inside `async with TaskGroup()`
    if type(app) is ASGIWrapper:
        self._nursery.start_soon(_handle_asgi, app.app, config, scope, inbox.receive, send)
        return inbox.put
    self._nursery.start_soon(
        task_group._handle,
        app,
        config,
        scope,
        inbox.receive,
        send,
        trio.to_thread.run_sync,
        trio.from_thread.run,
    )
    return inbox.put


async def _handle_asgi(
    app: ASGIFramework,
    config: Config,
    scope: Scope,
    receive: ASGIReceiveCallable,
    send: Callable[[ASGISendEvent | None], Awaitable[None]],
) -> None:
    """hypercorn's `_handle` with `ASGIWrapper.__call__` (which only passes three of
    its five arguments on) inlined: one suspended frame fewer for a whole stream."""
    try:
        await app(scope, receive, send)
    except trio.Cancelled:
        raise
    except BaseExceptionGroup as error:
        _, other_errors = error.split(trio.Cancelled)
        if other_errors is not None:
            await config.log.exception("Error in ASGI Framework")
            await send(None)
        else:
            raise
    except Exception:
        await config.log.exception("Error in ASGI Framework")
    finally:
        await send(None)


def mirrored() -> dict[str, object]:
    return {
        # hypercorn's, also while this module's replacement is in place
        "TaskGroup.spawn_app": _replacement.original or TaskGroup.spawn_app,
        "_handle": task_group._handle,
        "ASGIWrapper.__call__": ASGIWrapper.__call__,
    }


def _check() -> list[str]:
    return upstream.mismatches(EXPECTED_SOURCE_SHA256, mirrored())


_replacement = upstream.Replacement(log, TaskGroup, "spawn_app", _spawn_app, _check)
install = _replacement.install
uninstall = _replacement.uninstall
installed = _replacement.installed
