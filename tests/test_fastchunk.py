"""app.fastchunk: hypercorn's h11 chunk framing without h11's per-chunk bookkeeping.

End to end on real sockets with hypercorn's trio worker (the servers and clients of
tests/test_fastsend.py), with the adapter and without, and byte for byte against h11.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import h11
import pytest
import trio
from h11._writers import ChunkedWriter

from app import fastchunk
from app.upstream import mismatches
from tests.bothways import both_ways
from tests.rawhttp import LIMIT, StreamApp, connect, frame, request, serving

ROOT = Path(__file__).resolve().parent.parent


# Every end-to-end test runs with the adapter and without: same bytes.
framing = both_ways(fastchunk, "framing", on="fast")


def test_upstream_is_the_version_and_code_the_adapter_mirrors() -> None:
    """Fails when hypercorn or h11 moves: the pins, the installed versions and the
    source hashes of what is mirrored must move together (then re-read that code)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hypercorn=={version('hypercorn')}" in deps
    assert f"h11=={version('h11')}" in deps
    assert mismatches(fastchunk.EXPECTED_SOURCES_SHA256, fastchunk.upstream_sources()) == []


@pytest.mark.parametrize("size", [1, 15, 16, 70, 255, 4096, 65537, 262144])
def test_a_chunk_is_framed_as_h11_frames_it(size: int) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[]))
    assert type(conn._writer) is ChunkedWriter
    data = bytes(i % 251 for i in range(size))
    assert fastchunk.frame(data) == conn.send(h11.Data(data=data))


async def test_frames_arrive_exactly_and_in_order(framing: str) -> None:
    """Many chunks through a slow reader: h11 on the client side parses every one."""
    count = 5000
    app = StreamApp()
    async with serving(app, sndbuf=4096) as port:
        stream = await connect(port, rcvbuf=4096)
        async with stream:
            status, body = await request(
                stream, h11.Connection(h11.CLIENT), "GET", f"/stream/{count}", read_size=512
            )
    assert status == 200
    assert body == b"".join(frame(i) for i in range(count))


async def test_a_length_delimited_body_and_http_1_0_go_hypercorns_way(framing: str) -> None:
    """Not chunked: a Content-Length body (the echo) and an HTTP/1.0 client, whose body
    is written raw until the connection closes."""
    app = StreamApp()
    async with serving(app) as port:
        stream = await connect(port)
        async with stream:
            status, body = await request(stream, h11.Connection(h11.CLIENT), "POST", "/echo", b"hi")
        assert (status, body) == (200, b"hi")
        stream = await connect(port)
        async with stream:
            with trio.fail_after(LIMIT):
                await stream.send_all(b"GET /stream/3 HTTP/1.0\r\nHost: t\r\n\r\n")
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
    head, _, raw = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert raw == frame(0) + frame(1) + frame(2)  # no chunk framing for HTTP/1.0
