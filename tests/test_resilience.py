"""The bad day: stalled readers, vanished peers, several workers (service in a
subprocess where its memory is measured)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from app.listen import make_listener
from tests.conftest import watch_path
from tests.natsproc import NatsProcess
from tests.polling import poll_until, wait_until
from tests.procfs import children_of, rss_kib
from tests.rawnats import RawNats
from tests.served import served
from tests.sseclient import Response, request
from tests.streams import has_metric, metrics, parse, until_ok

# `has_metric` lived here once; tests elsewhere may still import it from here.
__all__ = ["has_metric"]


async def test_a_peer_that_stops_acknowledging_is_dropped_after_the_write_timeout(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(nats, tmp_path, "--write-timeout", "1") as srv:
        port, token, cids = srv.port, srv.token, srv.cids
        cid = cids[0]
        stalled = await request(port, watch_path(cid), token=token)
        stalled.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert await stalled.next_frame() == b":ok"
        pub = await RawNats.connect(nats.client_port)
        payload = json.dumps({"chunk_type": "token", "p": "q" * 4000}).encode()
        # Enough to fill the kernel's buffers on both sides and park the writer.
        await pub.publish_many([(f"chat.chunk.{cid}", payload)] * 3000)
        await pub.flush()
        await poll_until(lambda: has_metric(port, "chatwatch_watchers 0.0"), limit=20)
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
    async with served(nats, tmp_path, "--workers", "2") as srv:
        port, proc, token, cids = srv.port, srv.proc, srv.token, srv.cids
        streams = []
        for i in range(12):
            r = await request(port, watch_path(cids[i % 2]), token=token)
            assert r.status == 200
            streams.append(r)
            await until_ok(r)

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


async def test_a_dead_worker_stops_the_others_and_the_supervisor_fails(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(nats, tmp_path, "--workers", "2") as srv:
        await wait_until(lambda: len(children_of(srv.proc.pid)) >= 2, limit=10)
        first = children_of(srv.proc.pid)[0]
        os.kill(first, signal.SIGKILL)
        with trio.fail_after(10):
            code = await srv.proc.wait()
        assert code != 0
        assert "stopping the others" in (srv.log.read_text() if srv.log else "")


async def test_stalled_reader_during_a_full_speed_flood_over_100_conversations(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(
        nats,
        tmp_path,
        "--watcher-buffer",
        "2048",
        "--write-timeout",
        "300",
        conversations=100,
    ) as srv:
        # One stalled reader on the first conversation, one reader per conversation
        # that keeps up (it only counts bytes, it does not parse).
        stalled = await request(srv.port, watch_path(srv.cids[0]), token=srv.token)
        assert await stalled.next_frame() == b":ok"
        readers = []
        for cid in srv.cids:
            r = await request(srv.port, watch_path(cid), token=srv.token)
            assert await r.next_frame() == b":ok"
            readers.append(r)
        base = rss_kib(srv.proc.pid)
        peak = base
        pub = await RawNats.connect(nats.client_port)
        pad = "f" * 900
        # The stalled reader's conversation carries larger events, so that the kernel's
        # socket buffers (several MiB on loopback) fill and its writer parks.
        big = "B" * 60_000
        per_conversation = 300
        done = trio.Event()

        async def read_all(r: Response) -> None:
            while not done.is_set():
                await r.stream.receive_some(1 << 16)

        async with trio.open_nursery() as nursery:
            for r in readers:
                nursery.start_soon(read_all, r)
            with trio.fail_after(120):
                for i in range(per_conversation):
                    await pub.publish_many(
                        [
                            (
                                f"chat.chunk.{cid}",
                                json.dumps(
                                    {"chunk_type": "token", "i": i, "p": big if n == 0 else pad}
                                ).encode(),
                            )
                            for n, cid in enumerate(srv.cids)
                        ]
                    )
                    if i % 50 == 0:
                        peak = max(peak, rss_kib(srv.proc.pid))
                await pub.flush()
                # Every healthy reader got its conversation's events: the service
                # counted them out and none of them was cut off.
                await poll_until(
                    lambda: has_metric(srv.port, "chatwatch_slow_consumers_total 1.0"),
                    limit=120,
                )
            peak = max(peak, rss_kib(srv.proc.pid))
            done.set()
            nursery.cancel_scope.cancel()
        text = await metrics(srv.port)
        assert "chatwatch_slow_consumers_total 1.0" in text  # only the stalled one
        assert (peak - base) < 50 * 1024, f"RSS grew by {(peak - base) // 1024} MiB"
        stalled.abort()
        for r in readers:
            r.abort()
        await pub.aclose()


async def test_second_signal_exits_at_once_while_a_stalled_write_holds_shutdown(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(nats, tmp_path, "--write-timeout", "300") as srv:
        cid = srv.cids[0]
        stalled = await request(srv.port, watch_path(cid), token=srv.token, rcvbuf=4096)
        # (A server just started may not have its NATS connection yet: one frame more.)
        await until_ok(stalled)
        pub = await RawNats.connect(nats.client_port)
        big = json.dumps({"chunk_type": "token", "p": "z" * 500_000}).encode()
        await pub.publish_many([(f"chat.chunk.{cid}", big)] * 40)
        await pub.flush()
        # The writer is parked in hypercorn's (uncancellable) write to this client.
        await poll_until(
            lambda: has_metric(srv.port, "chatwatch_slow_consumers_total 1.0"), limit=20
        )
        srv.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(3):
            await srv.proc.wait()
        assert srv.proc.returncode is None  # the first shutdown is stuck on that write
        srv.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):  # at once, but the machine may be loaded
            code = await srv.proc.wait()
        assert code == 1
        assert srv.log is not None
        assert "second signal" in srv.log.read_text()
        stalled.abort()
        await pub.aclose()
