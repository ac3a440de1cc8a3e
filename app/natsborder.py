"""Every use of nats-py's private API, in one place, and why each is needed.

nats-py is pinned to ``>=2.16,<2.17`` in pyproject.toml because of this module: its
private attributes can change in any release. `missing_private_api` lists what is
used here; tests/test_natsborder.py fails, naming the attribute, on a nats-py that
lacks one, so a version bump is checked here first and then widened in the pin.

What the private API buys (public nats-py has no way to do these):
- inline delivery: a subscription's pending queue replaced by a direct call (one
  queue hop, task switch and asyncio task per conversation saved per message);
- a PING written behind the commands queued before it (nats-py writes PING straight
  to the transport, overtaking SUBs still in its pending buffer), with a PONG future
  that we own and never cancel (nats-py 2.16 kills its read loop when a pending
  ``flush()`` future is cancelled);
- a watchdog that notices the read loop died and forces a reconnect;
- an UNSUB written synchronously, from the trio side, in the step that ends a
  subscription: nats-py's ``unsubscribe()`` is a coroutine whose UNSUB waits for its
  flusher task, and every asyncio step costs a full trio scheduler pass here
  (trio-asyncio runs one asyncio callback per checkpoint): passes that 5000 closing
  streams make last hundreds of milliseconds (docs/findings.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import DEFAULT_FLUSH_TIMEOUT, Client
from nats.aio.subscription import Subscription
from nats.protocol import command as prot_command

# drain()'s last step is a flush() with nats-py's default timeout (no parameter).
FINAL_FLUSH_TIMEOUT: float = DEFAULT_FLUSH_TIMEOUT

# Handler: (subject, payload, headers), headers being nats-py's `msg.headers`.
Handler = Callable[[str, bytes, "dict[str, str] | None"], None]
ErrorReporter = Callable[[str], None]

CLIENT_ATTRIBUTES = (
    "_pending",  # list of commands waiting for the flusher
    "_pending_data_size",  # their size
    "_transport",  # where the flusher writes them
    "_send_ping",  # PING with our own PONG future
    "_reading_task",  # the read loop, watched
    "_process_op_err",  # the reconnect path nats-py takes on a socket error
    "_subs",  # sid -> Subscription, replayed on reconnect
    "_remove_sub",  # takes a sid out of that table
)
SUBSCRIPTION_ATTRIBUTES = (
    "_pending_queue",  # the read loop calls its put_nowait(msg)
    "_pending_size",  # the read loop adds len(msg.data) to it
    "_id",  # the sid an UNSUB names
    "_closed",  # set by unsubscribe(); a second one raises
    "_max_msgs",  # 0: no auto-unsubscribe count
    "_stop_processing",  # ends a callback subscription's task (none here; as nats-py)
)


def missing_private_api() -> list[str]:
    """The private names this module relies on that the installed nats-py lacks."""
    client = Client()
    sub = Subscription(client, 1, "x")
    missing = [f"Client.{a}" for a in CLIENT_ATTRIBUTES if not hasattr(client, a)]
    missing += [f"Subscription.{a}" for a in SUBSCRIPTION_ATTRIBUTES if not hasattr(sub, a)]
    return missing


class _DirectDelivery:
    """Stands in for a subscription's pending queue: delivers inline.

    nats-py's read loop hands each message to ``sub._pending_queue.put_nowait``
    (after adding its size to ``sub._pending_size``); by default an asyncio.Queue
    drained by one task per subscription. Here ``put_nowait`` calls the handler at
    once, in the read loop, in order. The handler only does non-blocking work;
    whatever it raises is reported, never allowed into nats-py's read loop.
    """

    __slots__ = ("_handler", "_report", "_sub")

    def __init__(self, sub: Any, handler: Handler, report: ErrorReporter) -> None:
        self._sub = sub
        self._handler = handler
        self._report = report

    def put_nowait(self, msg: Any) -> None:
        data = msg.data
        self._sub._pending_size -= len(data)
        try:
            self._handler(msg.subject, data, msg.headers)
        except Exception:
            self._report(msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        return None


def deliver_inline(sub: Any, handler: Handler, report: ErrorReporter) -> None:
    """Make nats-py's read loop call `handler` for each of `sub`'s messages."""
    sub._pending_queue = _DirectDelivery(sub, handler, report)


def _write_pending(nc: Any) -> None:
    """Write nats-py's queued commands now, in order, as its flusher task would."""
    if nc._pending_data_size > 0:
        nc._transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0


def unsubscribe_now(nc: Any, sub: Any) -> None:
    """Synchronously what ``await sub.unsubscribe()`` does, the UNSUB written at once.

    nats-py 2.16's ``Subscription.unsubscribe`` (limit 0): refuse on a closed or
    draining client or a closed subscription; mark it closed, stop its processing,
    drop it from the client's table (so a reconnect does not replay it); unless the
    client is reconnecting (the server forgot the subscription with the old
    connection), queue ``UNSUB <sid>`` behind what is pending. Then, connected, the
    pending commands are written now, in order, exactly as `ping_after_pending` does:
    the UNSUB can never overtake its own SUB. Not connected, it stays queued, as
    nats-py leaves it.

    Raises:
        nats.errors.Error: as nats-py's ``unsubscribe`` would.
    """
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining:
        raise nats.errors.ConnectionDrainingError
    if sub._closed:
        raise nats.errors.BadSubscriptionError
    sub._max_msgs = 0
    sub._closed = True
    sub._stop_processing()
    nc._remove_sub(sub._id)
    if nc.is_reconnecting:
        return
    cmd = prot_command.unsub_cmd(sub._id, 0)
    nc._pending.append(cmd)
    nc._pending_data_size += len(cmd)
    if nc.is_connected:
        _write_pending(nc)


async def ping_after_pending(nc: Any, loop: Any) -> asyncio.Future[Any]:
    """Asyncio side: send a PING behind everything queued; return its PONG future.

    nats-py queues SUB and PUB in `_pending` for its flusher task but writes PING
    straight to the transport, so its PING can overtake the commands it should
    confirm. Write the pending commands first, with no await in between, exactly as
    nats-py's flusher does. Not connected: the future never completes (nats-py
    replays SUBs on reconnect and flushes before `reconnected_cb`).
    """
    pong: asyncio.Future[Any] = loop.create_future()
    if nc.is_connected:
        _write_pending(nc)
        await nc._send_ping(pong)
    return pong


def read_loop_died(nc: Any) -> bool:
    """Whether the client says it is connected while its read loop has ended."""
    reader = nc._reading_task
    return bool(nc.is_connected and reader is not None and reader.done())


async def force_reconnect(nc: Any) -> None:
    """Asyncio side: take nats-py's own path for a failed socket (reconnect)."""
    await nc._process_op_err(nats.errors.StaleConnectionError())


def subscribed_subjects(nc: Any) -> list[str]:
    """Subjects in nats-py's subscription table (what it replays on reconnect)."""
    return [sub.subject for sub in nc._subs.values()]


def reconnect_wait(nc: Any) -> float:
    """Seconds nats-py waits before its next reconnect attempt to a server."""
    return float(nc.options["reconnect_time_wait"])


def set_reconnect_wait(nc: Any, seconds: float) -> None:
    """Change that wait on a live client (nats-py reads it before each attempt), so
    reconnecting can back off; nats-py itself only knows a fixed wait."""
    if nc is not None:
        nc.options["reconnect_time_wait"] = seconds
