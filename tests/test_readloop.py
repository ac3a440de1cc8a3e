"""app.readloop: hypercorn's read loop without its timeout scope or trio's socket
frames; same behaviour, with the adapter and without.

hypercorn's trio worker serving a bare ASGI app, clients raw trio sockets. The timer
tests run on trio's autojump MockClock (virtual time: a loaded machine cannot
stretch them).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from app import readloop, upstream
from tests.bothways import both_ways
from tests.rawhttp import LIMIT, StreamApp, connect, frame, request as http_request, serving

ROOT = Path(__file__).resolve().parent.parent


read_loop = both_ways(readloop, "read_loop")


def test_hypercorn_is_the_version_and_code_the_adapter_mirrors() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hypercorn=={version('hypercorn')}" in deps
    original = readloop.upstream_sources()["TCPServer._read_data"]
    assert upstream.source_sha256(original) == readloop.EXPECTED_SOURCE_SHA256


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(LIMIT):
        while data := await stream.receive_some(65536):
            received += data
    return received


async def test_requests_and_large_bodies_arrive_whole(read_loop: str) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB: more than one read of hypercorn's 64 KiB
    async with serving(StreamApp()) as port, await connect(port) as stream:
        conn = h11.Connection(h11.CLIENT)
        for _ in range(3):  # keep-alive: several requests on one connection
            assert await http_request(stream, conn, "POST", "/echo", body) == (200, body)
            conn.start_next_cycle()
        status, received = await http_request(stream, conn, "GET", "/stream/5")
        assert (status, received) == (200, b"".join(frame(i) for i in range(5)))


@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_a_client_going_away_ends_the_stream(read_loop: str, how: str) -> None:
    app = StreamApp()
    async with serving(app) as port:
        stream = await connect(port)
        with trio.fail_after(LIMIT):
            await stream.send_all(b"GET /forever HTTP/1.1\r\nHost: test\r\n\r\n")
            received = b""
            while frame(3) not in received:
                received += await stream.receive_some(65536)
            if how == "close":
                await stream.aclose()
            else:
                await stream.send_eof()  # EOF on the server's read: the end of the request
            await app.ended.wait()
        await stream.aclose()


async def test_the_keep_alive_timeout_still_closes_an_idle_connection(
    read_loop: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(StreamApp(), keep_alive=0.3) as port, await connect(port) as stream:
        started = trio.current_time()
        assert await read_until_closed(stream) == b""
        assert trio.current_time() - started >= 0.3 * 0.9


async def test_a_read_timeout_is_hypercorns_own_loop(
    read_loop: str, autojump_clock: trio.testing.MockClock
) -> None:
    """With read_timeout set the adapter hands over to hypercorn's loop, whose
    timeout ends the reading: a request sent after it gets no answer, and the
    connection closes with the keep-alive timer."""
    async with (
        serving(StreamApp(), keep_alive=5, read_timeout=0.3) as port,
        await connect(port) as stream,
    ):
        started = trio.current_time()
        # The server reading (its timeout armed), then past the timeout, and the
        # server has acted on it before the request is sent.
        await trio.testing.wait_all_tasks_blocked()
        autojump_clock.jump(1)
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(b"GET /stream/1 HTTP/1.1\r\nHost: test\r\n\r\n")
        try:
            received = await read_until_closed(stream)
        except trio.BrokenResourceError:
            received = b""  # closed with the request unread: a reset
        assert received == b""
        assert trio.current_time() - started >= 5 * 0.9


async def test_shutdown_ends_a_connection_waiting_to_read(read_loop: str) -> None:
    """The server's own close of the socket (hypercorn's shutdown) wakes the wait."""
    with trio.fail_after(LIMIT):
        async with serving(StreamApp()) as port:
            stream = await connect(port)
            await stream.send_all(b"GET /stream/1 HTTP/1.1\r\nHost: test\r\n\r\n")
            received = b""
            while not received.endswith(b"0\r\n\r\n"):
                received += await stream.receive_some(65536)
        # serving() has returned: the server is gone, and our end sees EOF.
        assert await read_until_closed(stream) == b""
        await stream.aclose()
