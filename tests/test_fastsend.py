"""app.fastsend: hypercorn's write path without a scheduler pass, on real sockets.

The servers here are hypercorn's trio worker serving a bare ASGI app (what the adapter
replaces sits below the app), the clients raw trio sockets with h11 parsing the bytes.
"""

from __future__ import annotations

import socket
import struct
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import h11
import pytest
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

from app import fastsend, upstream
from tests.bothways import both_ways
from tests.rawhttp import LIMIT, StreamApp, connect, frame, request, serving

ROOT = Path(__file__).resolve().parent.parent


# Every end-to-end test runs with the adapter and without: same behaviour.
write_path = both_ways(fastsend, "write_path", on="fast")


@pytest.fixture
def fast() -> Iterator[None]:
    fastsend.uninstall()
    assert fastsend.install()
    yield
    fastsend.uninstall()


# ------------------------------------------------------------ the upstream check


def test_hypercorn_is_the_version_and_code_the_adapter_mirrors() -> None:
    """Fails when hypercorn moves: the pin, the installed version and the source hash
    of the one method replaced must all move together (then re-read that method)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hypercorn=={version('hypercorn')}" in deps
    original = fastsend.upstream_sources()["TCPServer.protocol_send"]
    assert upstream.source_sha256(original) == fastsend.EXPECTED_SOURCE_SHA256


# ------------------------------------------------------------ end to end


async def test_frames_arrive_exactly_and_in_order_through_a_slow_reader(write_path: str) -> None:
    """Small buffers on both ends and a reader taking 512 bytes a turn: the kernel takes
    part of many writes, whose rest must go out before any later frame."""
    count = 20000
    app = StreamApp()
    before = fastsend.stats.partial
    async with serving(app, sndbuf=4096) as port:
        stream = await connect(port, rcvbuf=4096)
        async with stream:
            status, body = await request(
                stream, h11.Connection(h11.CLIENT), "GET", f"/stream/{count}", read_size=512
            )
    assert status == 200
    expected = b"".join(frame(i) for i in range(count))
    assert len(body) == len(expected)
    assert body == expected
    if write_path == "fast":
        assert fastsend.stats.partial > before  # the fallback was exercised


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_going_away_ends_the_stream(write_path: str, how: str) -> None:
    app = StreamApp()
    async with serving(app) as port:
        stream = await connect(port)
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method="GET", target="/forever", headers=[("host", "t")]))
        with trio.fail_after(LIMIT):
            await stream.send_all(out)
            received = b""
            while received.count(b"\n") < 100:
                received += await stream.receive_some(65536)
        if how == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        with trio.fail_after(LIMIT):
            await app.ended.wait()


async def test_ordinary_requests_still_work(write_path: str) -> None:
    app = StreamApp()
    async with serving(app) as port:
        stream = await connect(port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            assert await request(stream, conn, "POST", "/echo", b"hello") == (200, b"hello")
            conn.start_next_cycle()  # the same connection, kept alive
            big = bytes(range(256)) * 4096  # 1 MiB: more than one write
            assert await request(stream, conn, "POST", "/echo", big) == (200, big)
            conn.start_next_cycle()
            status, body = await request(stream, conn, "GET", "/stream/3")
            assert (status, body) == (200, frame(0) + frame(1) + frame(2))


class Steps(trio.abc.Instrument):
    """Scheduler passes of the app's body loop while it writes."""

    def __init__(self, app: StreamApp) -> None:
        self.app = app
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.app.task and self.app.counting:
            self.steps += 1


async def test_a_frame_the_kernel_takes_whole_costs_no_scheduler_pass(write_path: str) -> None:
    """What the adapter is for, counted rather than timed: hypercorn's own path parks the
    writing task twice a frame (the lock, the send); the fast path once in YIELD_EVERY."""
    count = 1000  # 70 kB: the kernel's loopback buffers take it all
    app = StreamApp()
    steps = Steps(app)
    async with serving(app) as port:
        stream = await connect(port)
        async with stream:
            trio.lowlevel.add_instrument(steps)
            try:
                status, _ = await request(
                    stream, h11.Connection(h11.CLIENT), "GET", f"/stream/{count}"
                )
            finally:
                trio.lowlevel.remove_instrument(steps)
    assert status == 200
    if write_path == "fast":
        assert steps.steps <= count // fastsend.YIELD_EVERY + 10
    else:
        assert steps.steps >= 2 * count


# ------------------------------------------------------------ a write that fails


class Recorder:
    """Stands in for hypercorn's protocol object: records what the write path tells it."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def handle(self, event: Event) -> None:
        self.events.append(event)


@pytest.mark.parametrize("use_fast", [True, False], ids=["fast", "hypercorn"])
@pytest.mark.parametrize("peer", ["reset", "closed-unix", "closed-here"])
async def test_a_failed_write_is_a_closed_connection_as_upstream_has_it(
    use_fast: bool, peer: str
) -> None:
    """ECONNRESET (a TCP peer's reset), EPIPE (a closed peer) and EBADF (our own socket
    closed) all end in one ``Closed`` handed to the protocol, with either write path."""
    fastsend.uninstall()
    if use_fast:
        assert fastsend.install()
    try:
        if peer == "closed-here":
            ours = trio.socket.socket()
            ours.close()
        elif peer == "closed-unix":
            ours, theirs = trio.socket.socketpair()
            theirs.close()
        else:
            listener = trio.socket.socket()
            await listener.bind(("127.0.0.1", 0))
            listener.listen()
            ours = trio.socket.socket()
            with trio.fail_after(LIMIT):
                await ours.connect(listener.getsockname())
                theirs, _ = await listener.accept()
            listener.close()
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            theirs.close()
            with trio.fail_after(LIMIT):  # the RST has arrived once a read sees it
                with pytest.raises(ConnectionResetError):
                    await ours.recv(1)
        server = TCPServer.__new__(TCPServer)  # only what protocol_send uses
        server.stream = trio.SocketStream(ours)  # type: ignore[assignment]
        server.send_lock = trio.Lock()
        recorder = Recorder()
        closed_before = fastsend.stats.closed
        server.protocol = recorder  # type: ignore[assignment]
        with ours, trio.fail_after(LIMIT):
            await server.protocol_send(RawData(data=frame(0)))
            await server.protocol_send(RawData(data=frame(1)))
        assert all(isinstance(e, Closed) for e in recorder.events)
        assert recorder.events  # at least the second write fails
        assert not server.send_lock.locked()
        assert (fastsend.stats.closed > closed_before) == use_fast  # the path under test
    finally:
        fastsend.uninstall()
