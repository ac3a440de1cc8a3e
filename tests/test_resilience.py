"""The bad day: stalled readers, vanished peers, several workers (service in a
subprocess where its memory is measured)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from app.listen import make_listener
from app.store import SQLiteStore
from tests.conftest import wait_until, watch_path
from tests.natsproc import NatsProcess
from tests.rawnats import RawNats
from tests.resilience_util import free_port
from tests.sseclient import request
from tests.test_delivery import parse


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@asynccontextmanager
async def served(
    nats: NatsProcess, tmp_path: Path, *args: str
) -> AsyncGenerator[tuple[int, trio.Process, str, list[str]], None]:
    """`python -m app serve` in a subprocess; yields (port, process, token, conv ids)."""
    db = tmp_path / "cw.db"
    store = SQLiteStore(db)
    user = await store.add_user("u")
    token = await store.create_session(user)
    cids = [await store.create_conversation(user) for _ in range(4)]
    await store.aclose()
    port = free_port()
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--bind",
            f"127.0.0.1:{port}",
            "--nats-url",
            nats.url,
            "--database-url",
            f"sqlite:///{db}",
            "--max-watchers-per-session",
            "1000",
            "--log-level",
            "warning",
            *args,
        ],
    )
    try:
        with trio.fail_after(15):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield port, proc, token, cids
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_stalled_reader_is_bounded_and_others_get_everything(
    nats: NatsProcess, tmp_path: Path
) -> None:
    n_events, size = 20000, 1024
    # A long write timeout: this test reads the stalled socket at the end.
    async with served(nats, tmp_path, "--watcher-buffer", "4096", "--write-timeout", "300") as (
        port,
        proc,
        token,
        cids,
    ):
        cid = cids[0]
        # The stalled client never reads after `:ok` (the kernel's buffers on both
        # sides hold a few MiB; 20 MiB are published).
        stalled = await request(port, watch_path(cid), token=token)
        assert await stalled.next_frame() == b":ok"
        healthy = await request(port, watch_path(cid), token=token)
        assert await healthy.next_frame() == b":ok"
        base = rss_kb(proc.pid)
        pub = await RawNats.connect(nats.client_port)
        pad = "p" * (size - 60)
        peak = base
        received = 0

        # Published in batches of 500 as fast as the healthy reader takes them: it
        # keeps up, the stalled one cannot.
        with trio.fail_after(120):
            for start in range(0, n_events, 500):
                await pub.publish_many(
                    [
                        (
                            f"chat.chunk.{cid}",
                            json.dumps({"chunk_type": "token", "i": i, "p": pad}).encode(),
                        )
                        for i in range(start, start + 500)
                    ]
                )
                while received < start + 500:
                    frame = await healthy.next_frame()
                    assert frame is not None
                    if frame.startswith(b":"):
                        continue
                    event, data = parse(frame)
                    assert (event, data["i"]) == ("token", received)  # type: ignore[index]
                    received += 1
                peak = max(peak, rss_kb(proc.pid))
        peak = max(peak, rss_kb(proc.pid))
        assert received == n_events
        assert (peak - base) < 50 * 1024, f"RSS grew by {(peak - base) // 1024} MiB"
        # The stalled watcher was cut off as a slow consumer: its socket, once read,
        # shows the buffered frames and then the error, then the end of the stream.
        assert "chatwatch_slow_consumers_total 1.0" in await metrics(port)
        with trio.fail_after(30):
            rest = await stalled.read_body()
        last = rest.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert parse(last)[0] == "error"
        assert "slow consumer" in str(parse(last)[1])
        await pub.aclose()
        await healthy.aclose()


async def metrics(port: int) -> str:
    from tests.sseclient import get

    return (await get(port, "/metrics"))[2].decode()


async def test_a_peer_that_stops_acknowledging_is_dropped_after_the_write_timeout(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(nats, tmp_path, "--write-timeout", "1") as (port, _, token, cids):
        cid = cids[0]
        stalled = await request(port, watch_path(cid), token=token)
        stalled.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert await stalled.next_frame() == b":ok"
        pub = await RawNats.connect(nats.client_port)
        payload = json.dumps({"chunk_type": "token", "p": "q" * 4000}).encode()
        # Enough to fill the kernel's buffers on both sides and park the writer.
        await pub.publish_many([(f"chat.chunk.{cid}", payload)] * 3000)
        await pub.flush()
        with trio.fail_after(20):
            while "chatwatch_watchers 0.0" not in await metrics(port):  # ruff: ignore[async-busy-wait]
                await trio.sleep(0.1)  # polling another process's state
        stalled.abort()
        await pub.aclose()


def test_accepted_connections_inherit_keepalive_and_write_timeout() -> None:
    listener = make_listener("127.0.0.1", 0, write_timeout=7.5)
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    finally:
        conn.close()
        client.close()
        listener.close()


async def test_two_workers_share_the_port_and_both_deliver(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(nats, tmp_path, "--workers", "2") as (port, proc, token, cids):
        streams = []
        for i in range(12):
            r = await request(port, watch_path(cids[i % 2]), token=token)
            assert r.status == 200
            assert await r.next_frame() == b":ok"
            streams.append(r)

        def connections() -> int:
            return len([c for c in nats.monitor("/connz")["connections"] or []])

        # Two processes, each its own NATS connection.
        await wait_until(lambda: connections() >= 2)
        pub = await RawNats.connect(nats.client_port)
        await pub.publish(f"chat.chunk.{cids[0]}", b'{"chunk_type":"token","w":1}')
        await pub.publish(f"chat.chunk.{cids[1]}", b'{"chunk_type":"token","w":2}')
        for i, r in enumerate(streams):
            with trio.fail_after(5):
                assert parse(await r.next_frame() or b"")[1] == {
                    "chunk_type": "token",
                    "w": 1 + i % 2,
                }
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await proc.wait()
        assert code == 0
        for r in streams:
            await r.aclose()
        await pub.aclose()


def test_workers_children_are_real_processes(tmp_path: Path) -> None:
    # `--workers` must not be silently ignored by `serve --help`.
    out = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    ).stdout
    assert "--workers" in out
