"""HTTP/1.1 chunk framing for hypercorn's h11 protocol without a trip through h11's
state machine per body chunk.

For every chunk of a response body, hypercorn 0.18.0's ``H11Protocol.stream_send``
builds an ``h11.Data`` event and calls ``h11.Connection.send``: the state machine
processes the event (a transition from SEND_BODY to SEND_BODY: nothing changes), the
chunked writer appends ``b"%x\\r\\n" % len(data)``, the data and ``b"\\r\\n"`` to a list,
and ``send`` joins it. For an SSE frame of tens of bytes, that bookkeeping cost more
than the fast send's write itself (tests/bench/frame_layers.py, docs/findings.md).

`install` replaces that one method with one that, for a non-empty ``Body`` while h11
is in SEND_BODY with its chunked writer (an HTTP/1.1 response without a length),
frames the chunk itself, byte for byte what h11's writer would produce, and passes it
on exactly as hypercorn does (``self.send(RawData(...))``). Every other event, state
or writer (HTTP/1.0, a Content-Length body, an error state) goes to hypercorn's
method unchanged. Nothing in h11 is skipped that could change: a ``Data`` event in
SEND_BODY moves no state.

As app/fastsend.py does, `install` checks the sha256 of the sources it mirrors
(hypercorn's ``stream_send`` and h11's ``ChunkedWriter.send_data``) and leaves
hypercorn alone, with a warning, when either differs: an upgrade costs the speed-up,
never correctness. pyproject.toml pins the versions; tests/test_fastchunk.py fails
on a change.
"""

from __future__ import annotations

import logging

import h11
from h11._writers import ChunkedWriter
from hypercorn.events import RawData
from hypercorn.protocol.events import Body, Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol

from app import upstream

log = logging.getLogger("chatwatch.fastchunk")

# sha256 of the dedented sources of hypercorn 0.18.0's H11Protocol.stream_send and of
# h11 0.16.0's ChunkedWriter.send_data.
EXPECTED_SOURCES_SHA256 = {
    "stream_send": "c7ef437818f28b283858b48557e81d5de45273000638400e4ebf4347c4002078",
    "send_data": "a526bf1ca03da91511505340da071d6a51a0cf610d4f19826a785933c7c46994",
}


def upstream_sources() -> dict[str, object]:
    """What this module mirrors (upstream's, also while the replacement is in place)."""
    stream_send = _replacement.original or H11Protocol.stream_send
    return {"stream_send": stream_send, "send_data": ChunkedWriter.send_data}


def _check() -> list[str]:
    return upstream.mismatches(EXPECTED_SOURCES_SHA256, upstream_sources())


def frame(data: bytes) -> bytes:
    """One chunk as h11's ChunkedWriter writes it: hex length, CRLF, data, CRLF."""
    return b"%x\r\n%b\r\n" % (len(data), data)


async def _stream_send(self: H11Protocol, event: StreamEvent) -> None:
    if type(event) is Body and event.data:
        connection = self.connection
        if connection.our_state is h11.SEND_BODY and type(connection._writer) is ChunkedWriter:
            await self.send(RawData(data=frame(event.data)))
            return
    original = _replacement.original
    assert original is not None  # only installed together with the original
    await original(self, event)


_replacement = upstream.Replacement(log, H11Protocol, "stream_send", _stream_send, _check)
install = _replacement.install
uninstall = _replacement.uninstall
installed = _replacement.installed
