"""hypercorn's per-connection read loop with less held while it waits.

Every connection's first task spends its life in ``TCPServer._read_data``, parked in
``SocketStream.receive_some``; an idle SSE connection parks there for hours, and
what the wait holds lives as long (docs/findings.md, "What an idle watcher holds"):
a ``fail_after`` cancel scope (with ``read_timeout`` unset, hypercorn's default and
ours, its deadline is infinite), and four suspended trio frames between the loop and
the wait (``receive_some``, its error-translating context manager, the socket's
``recv`` and ``_nonblocking_helper``). `_read_data` does the same with the loop's
own frame: a non-blocking ``os.read`` on the socket's descriptor, and
``trio.lowlevel.wait_readable`` when there is nothing to read. Same checkpoints as
trio's ``recv`` (a cancellation is seen before a read, and a read that returns at
once still yields), same ends as hypercorn's loop (any socket error, or the socket
closed meanwhile, ends it as ``ClosedResourceError`` and ``BrokenResourceError``
do; EOF as EOF). With ``read_timeout`` set, or a TLS stream, hypercorn's own loop
runs.

Why a replacement checked against a source hash, over a pinned hypercorn (as
app/fastsend.py): the method is a private detail of hypercorn. `install` hashes it
and leaves hypercorn alone, with a warning, when it is not the code this module was
written against. POSIX only (``os.read`` on a socket), like the fast send.
"""

from __future__ import annotations

import logging
import os

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from app import upstream

log = logging.getLogger("chatwatch.readloop")

# sha256 of the dedented source of hypercorn 0.18.0's TCPServer._read_data.
EXPECTED_SOURCE_SHA256 = "73588ef2e57091d4ff384c80859ab0aac84c013006609611debeb2b49ec56344"


def upstream_sources() -> dict[str, object]:
    """What this module mirrors (upstream's, also while the replacement is in place)."""
    return {"TCPServer._read_data": _replacement.original or TCPServer._read_data}


def _check() -> list[str]:
    return upstream.mismatches({"TCPServer._read_data": EXPECTED_SOURCE_SHA256}, upstream_sources())


def _read_now(sock: trio.socket.SocketType) -> bytes | None:
    """What the socket has (b"" at EOF), or None when a read would block. A closed
    socket's descriptor is -1: the read fails (EBADF), it never reads another's."""
    try:
        return os.read(sock.fileno(), MAX_RECV)
    except BlockingIOError:
        return None


async def _read_data(self: TCPServer) -> None:
    # Annotated upstream as an SSLStream; a SocketStream when there is no TLS.
    stream: trio.abc.Stream = self.stream
    if self.config.read_timeout or type(stream) is not trio.SocketStream:
        original = _replacement.original
        assert original is not None  # only installed together with the original
        await original(self)
        return
    sock = stream.socket
    while True:
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = _read_now(sock)
            if data is None:
                while data is None:
                    await trio.lowlevel.wait_readable(sock)
                    data = _read_now(sock)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            # trio's receive_some raises one of the first two for any socket error
            # (EBADF: closed); hypercorn's loop ends on either.
            break
        await self.protocol.handle(RawData(data))
        if data == b"":
            break
    await self.protocol.handle(Closed())


_replacement = upstream.Replacement(
    log, TCPServer, "_read_data", _read_data, _check, posix_only=True
)
install = _replacement.install
uninstall = _replacement.uninstall
installed = _replacement.installed
