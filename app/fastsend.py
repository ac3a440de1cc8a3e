"""A write path for hypercorn's trio worker that costs no scheduler pass when the kernel
takes the data at once.

hypercorn's ``TCPServer.protocol_send`` writes every chunk of a response by taking the
connection's ``send_lock`` (a checkpoint), opening a shielded cancel scope and calling
``SocketStream.send_all`` (another checkpoint). Those two trio scheduler passes are
nearly all of what a small frame costs (docs/hypercorn-write-path.md has the figures).
`install` replaces that one method with one that, when the lock is free, takes it
without a checkpoint and writes with one non-blocking ``os.write`` on the socket's
descriptor; when the lock is held, or the kernel takes only part of the data, it
falls back to what hypercorn does (lock, shield, ``send_all``), so ordering and the
"a started write finishes" promise are kept. Any ``OSError`` from the write closes
the connection as hypercorn's own path does (``send_all`` turns every ``OSError``
into ``BrokenResourceError`` or ``ClosedResourceError``, both of which it maps to
``Closed``). Cancellation is delivered at the caller's next checkpoint (a response
body's channel ``receive``); and so that a body which never checkpoints between
chunks cannot starve the other tasks, every `YIELD_EVERY`-th fast write checkpoints.

Why a replacement checked against a source hash, over a pinned hypercorn: the method
is a private detail of hypercorn, and its semantics (which lock, which errors mean
closed) are what this code mirrors. `install` hashes the method's source and, when it
is not the one this module was written against, logs a warning and leaves hypercorn
alone: an upgrade costs the speed-up, never correctness. pyproject.toml pins the
version the hash was taken from, so the check fails in the tests, not in production.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

from app import upstream

log = logging.getLogger("chatwatch.fastsend")

# sha256 of the dedented source of hypercorn 0.18.0's TCPServer.protocol_send.
EXPECTED_SOURCE_SHA256 = "22b51ba714d07580a0c352848e88b4e849e977e2891eebfbf36286492a3696c8"

# A fast write never checkpoints; one in this many does, so a body loop that itself
# never checkpoints still lets other tasks run (and sees its cancellation).
YIELD_EVERY = 64


@dataclass(slots=True)
class Stats:
    """Counts for tests and measurements: which way each write went."""

    fast: int = 0  # written whole by one os.write, no scheduler pass
    partial: int = 0  # the kernel took part (or none): the rest went hypercorn's way
    closed: int = 0  # the write failed: the connection was handled as closed


stats = Stats()


def upstream_sources() -> dict[str, object]:
    """What this module mirrors (upstream's, also while the replacement is in place)."""
    return {"TCPServer.protocol_send": _replacement.original or TCPServer.protocol_send}


def _check() -> list[str]:
    return upstream.mismatches(
        {"TCPServer.protocol_send": EXPECTED_SOURCE_SHA256}, upstream_sources()
    )


async def _protocol_send(self: TCPServer, event: Event) -> None:
    original = _replacement.original
    assert original is not None  # only installed together with the original
    # Annotated upstream as an SSLStream; a SocketStream when there is no TLS.
    stream: trio.abc.Stream = self.stream
    lock = self.send_lock
    if (
        type(event) is not RawData
        or not isinstance(stream, trio.SocketStream)  # TLS: the SSL object owns the bytes
        or lock.locked()
        or not event.data
    ):
        await original(self, event)
        return
    data = event.data
    # The lock is free and nothing can run before the write below returns (no
    # checkpoint): no other writer can start meanwhile, so a write the kernel takes
    # whole needs no lock. It is taken, still free, for what can checkpoint: the rest
    # of a partial write, or closing.
    try:
        sent = os.write(stream.socket.fileno(), data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        sent = -1
    if sent != len(data):
        lock.acquire_nowait()  # free, checked above, and nothing ran since: cannot block
        try:
            if sent < 0:
                stats.closed += 1
                # EPIPE, ECONNRESET, EBADF (closed): hypercorn's send_all raises
                # BrokenResourceError or ClosedResourceError for these; it handles both so.
                await self.protocol.handle(Closed())
            else:
                stats.partial += 1
                # The kernel's buffer is full: the rest goes hypercorn's way, still under
                # the lock, so no later chunk can overtake it.
                try:
                    with trio.CancelScope(shield=True):
                        await stream.send_all(memoryview(data)[sent:])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                return
        finally:
            lock.release()
        # hypercorn's path always checkpoints; a body writing into a dead connection
        # without one would spin and starve the reader that is to tell it so.
        await trio.lowlevel.checkpoint()
        return
    stats.fast += 1
    countdown: int = getattr(self, "_chatwatch_fast_writes", YIELD_EVERY) - 1
    if countdown <= 0:
        countdown = YIELD_EVERY
        self._chatwatch_fast_writes = countdown  # type: ignore[attr-defined]
        await trio.lowlevel.checkpoint()
    else:
        self._chatwatch_fast_writes = countdown  # type: ignore[attr-defined]


_replacement = upstream.Replacement(
    log, TCPServer, "protocol_send", _protocol_send, _check, posix_only=True
)
install = _replacement.install
uninstall = _replacement.uninstall
installed = _replacement.installed
