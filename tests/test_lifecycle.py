"""Lifecycle: disconnects, NATS outages, the nats-py flush bug, shutdown."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

import trio
import trio.lowlevel

from tests.conftest import (
    Service,
    chunk,
    start_service,
    wait_until,
    watch_path,
)
from tests.natsproc import NatsProcess
from tests.rawnats import RawNats
from tests.served import served
from tests.sseclient import Response, get, request
from tests.streams import parse, watch, watch_port

# Far longer than any test runs: a stream that ends was ended by its client's
# disconnect, not noticed on a keepalive write ("with no message needed to notice").
NO_KEEPALIVE = 3600.0
# "Promptly": milliseconds when idle (NOTES.md); generous for a loaded machine.
PROMPTLY = 10.0


async def test_abrupt_close_of_50_idle_watchers_removes_subscriptions_without_a_write(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, keepalive=NO_KEEPALIVE)
    seeds = await svc.seed(conversations=50)
    watchers = [await watch(svc, s.conversation_id, s.token) for s in seeds]
    assert len(await svc.nats.chat_subscriptions_async()) == 50
    for i, w in enumerate(watchers):
        if i % 2:
            w.abort()  # RST
        else:
            await w.aclose()  # FIN
    await wait_until(lambda: svc.nats.chat_subscriptions() == [], limit=PROMPTLY)
    await svc.store.aclose()


async def test_abrupt_close_under_a_flood_removes_subscriptions(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, keepalive=NO_KEEPALIVE)
    seeds = await svc.seed(conversations=50)
    watchers = [await watch(svc, s.conversation_id, s.token) for s in seeds]
    pub = await svc.publisher()
    flooding = trio.Event()

    async def flood() -> None:
        batch = [(f"chat.chunk.{s.conversation_id}", chunk("token", text="x" * 200)) for s in seeds]
        while True:
            await pub.publish_many(batch)
            flooding.set()
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as flooder:
        flooder.start_soon(flood)
        await flooding.wait()
        for w in watchers:
            w.abort()
        await wait_until(lambda: svc.nats.chat_subscriptions() == [], limit=PROMPTLY)
        flooder.cancel_scope.cancel()
    await pub.aclose()
    await svc.store.aclose()


async def test_disconnects_while_subscribing_never_stop_delivery(svc: Service) -> None:
    """Regression for the nats-py 2.16 cancelled-flush bug (NOTES.md): 200 watchers
    hang up while their subscription is being confirmed; delivery must go on."""
    seeds = await svc.seed(conversations=200)
    for s in seeds:
        response = await request(svc.port, watch_path(s.conversation_id), token=s.token)
        assert response.status == 200
        response.abort()  # before (or while) the SUB is confirmed
    (probe,) = await svc.seed()
    w = await watch(svc, probe.conversation_id, probe.token)
    pub = await svc.publisher()
    for i in range(20):
        await pub.publish(f"chat.chunk.{probe.conversation_id}", chunk("token", seq=i))
    with trio.fail_after(5):
        frames = await w.frames_until(count=20)
    assert [parse(f)[1]["seq"] for f in frames] == list(range(20))  # type: ignore[index]
    w.abort()
    await wait_until(lambda: svc.nats.chat_subscriptions() == [])
    await pub.aclose()


async def test_nats_restart_mid_stream_keeps_the_stream_and_resumes(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    w = await watch(svc, cid, seed.token)
    svc.nats.kill()
    with trio.fail_after(10):
        frame = await w.next_frame()
    assert frame is not None
    assert parse(frame) == ("error", "NATS connection lost")
    await trio.to_thread.run_sync(svc.nats.start)
    # Streams stay open; once the service resubscribed, events flow again.
    await wait_until(lambda: svc.nats.chat_subscriptions() == [f"chat.*.{cid}"])
    status, _, _ = await _get_ready(svc)
    assert status == 200
    pub = await RawNats.connect(svc.nats.client_port)
    await pub.publish(f"chat.chunk.{cid}", chunk("token", text="back"))
    with trio.fail_after(5):
        frame = await w.next_frame()
        while frame is not None and frame.startswith(b":"):
            frame = await w.next_frame()
    assert frame is not None
    assert parse(frame) == ("token", {"chunk_type": "token", "text": "back"})
    w.abort()
    await pub.aclose()


async def _get_ready(svc: Service) -> tuple[int, dict[str, str], bytes]:
    return await get(svc.port, "/readyz")


async def test_watcher_arriving_while_nats_is_down_gets_error_then_ok(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    down = NatsProcess()
    down.start()
    down.kill()  # keep its ports: nothing listens there now
    try:
        svc = await start_service(nursery, down, tmp_path)
        (seed,) = await svc.seed()
        status, _, body = await _get_ready(svc)
        assert status == 503
        assert json.loads(body) == {"nats": False, "store": True, "history": False}
        response = await request(svc.port, watch_path(seed.conversation_id), token=seed.token)
        assert response.status == 200
        with trio.fail_after(5):
            frame = await response.next_frame()
        assert frame is not None
        assert parse(frame) == ("error", "NATS not available")
        await trio.to_thread.run_sync(down.start)
        with trio.fail_after(10):
            assert await response.next_frame() == b":ok"
        status, _, _ = await _get_ready(svc)
        assert status == 200
        pub = await RawNats.connect(down.client_port)
        await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("token", n=1))
        with trio.fail_after(5):
            frame = await response.next_frame()
        assert parse(frame or b"") == ("token", {"chunk_type": "token", "n": 1})
        response.abort()
        await pub.aclose()
        await svc.store.aclose()
    finally:
        down.stop()


async def test_idle_stream_gets_keepalives(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, keepalive=0.1)
    # Connected first: a stream that waits for NATS gets keepalives before its `:ok`.
    await wait_until(lambda: nats.monitor("/connz")["num_connections"] >= 1)
    (seed,) = await svc.seed()
    w = await watch(svc, seed.conversation_id, seed.token)
    with trio.fail_after(5):
        assert await w.next_frame() == b": keepalive"
        assert await w.next_frame() == b": keepalive"
    w.abort()
    await svc.store.aclose()


# A grace period no test waits for: a shutdown that finishes well within it ended its
# streams itself instead of leaving them to hypercorn's grace timeout.
LONG_GRACE = "120"
# Generous for a loaded machine, and still far below LONG_GRACE.
SHUTDOWN_LIMIT = 30
# No keepalive comment may come before the shutdown's frame: on a loaded machine,
# opening 2000 streams took longer than the default 15 s, and the first ones got one
# (a run counted 1040 of 2000 bodies starting with the retry frame).
KEEPALIVE_OFF_ARGS = ("--keepalive", "3600")


async def test_sigterm_with_open_streams_ends_them_and_exits_0(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(
        nats,
        tmp_path,
        "--shutdown-grace",
        LONG_GRACE,
        *KEEPALIVE_OFF_ARGS,
        conversations=5,
        db_in_env=True,
    ) as srv:
        streams = [await watch_port(srv.port, c, srv.token) for c in srv.cids]
        srv.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(SHUTDOWN_LIMIT):
            for s in streams:
                rest = await s.read_body(limit=SHUTDOWN_LIMIT)
                assert rest.startswith(b"retry: 1000\n")
                await s.aclose()
            code = await srv.proc.wait()
        assert code == 0
        assert srv.log is not None
        assert b"Traceback" not in srv.log.read_bytes()


async def test_unknown_subject_kinds_are_ignored(svc: Service) -> None:
    (seed,) = await svc.seed()
    w = await watch(svc, seed.conversation_id, seed.token)
    pub = await svc.publisher()
    await pub.publish(f"chat.other.{seed.conversation_id}", b'{"x":1}')
    await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("done"))
    with trio.fail_after(5):
        assert parse(await w.next_frame() or b"")[0] == "done"
    w.abort()
    await pub.aclose()


async def test_sigterm_with_2000_open_streams_ends_each_one_and_exits_0(
    nats: NatsProcess, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    async with served(
        nats,
        tmp_path,
        "--max-watchers-per-session",
        "5000",
        "--shutdown-grace",
        LONG_GRACE,
        *KEEPALIVE_OFF_ARGS,
        conversations=400,
    ) as srv:
        streams: list[Response] = []
        limiter = trio.CapacityLimiter(200)

        async def connect(cid: str) -> None:
            async with limiter:
                streams.append(await watch_port(srv.port, cid, srv.token))

        async with trio.open_nursery() as nursery:
            for i in range(2000):
                nursery.start_soon(connect, srv.cids[i % len(srv.cids)])
        ended = 0

        async def drain(s: Response) -> None:
            nonlocal ended
            if (await s.read_body(limit=SHUTDOWN_LIMIT)).startswith(b"retry: 1000\n"):
                ended += 1

        srv.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(SHUTDOWN_LIMIT):
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(drain, s)
            code = await srv.proc.wait()
        assert (code, ended) == (0, 2000)
        for s in streams:
            await s.aclose()
