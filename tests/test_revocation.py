"""Open streams of revoked or expired sessions end (CONTRACT, `sessions revoke`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio
import trio.testing

from app import sse
from app.errors import StoreUnavailable
from app.hub import open_hub
from app.revocation import end_revoked_sessions
from tests.conftest import Service, chunk, start_service, watch_path
from tests.fakes import FakeBus
from tests.natsproc import NatsProcess
from tests.sseclient import Response, request

CID = "01234567-89ab-cdef-0123-456789abcdef"


async def _open(svc: Service, cid: str, token: str) -> Response:
    with trio.fail_after(10):
        response = await request(svc.port, watch_path(cid), token=token)
        assert response.status == 200
        assert await response.next_frame() == b":ok"
    return response


async def _rest_of(stream: Response, limit: float) -> list[bytes]:
    """Every frame until the server ends the stream, which it must within `limit` s."""
    with trio.fail_after(limit):
        frames = []
        while (frame := await stream.next_frame()) is not None:
            frames.append(frame)
    return frames


def _events(frames: list[bytes]) -> list[tuple[str, object]]:
    out = []
    for frame in frames:
        if frame.startswith(b"data: "):
            obj = json.loads(frame[6:])
            out.append((obj["event"], obj["data"]))
    return out


async def test_revoking_through_the_cli_ends_streams_on_every_instance(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    # Two instances on one database file: the CLI, a third process, revokes.
    first = await start_service(nursery, nats, tmp_path)
    second = await start_service(nursery, nats, tmp_path)
    (seed,) = await first.seed()
    other = await first.store.create_session(seed.user_id)
    cid = seed.conversation_id
    streams = [await _open(svc, cid, seed.token) for svc in (first, second)]
    bystander = await _open(first, cid, other)
    pub = await first.publisher()
    # Events keep coming the whole time: none may follow the error frame.
    publishing = trio.CancelScope()

    async def publish() -> None:
        with publishing:
            i = 0
            while True:
                await pub.publish(f"chat.chunk.{cid}", chunk("token", seq=i))
                i += 1
                await trio.sleep(0.01)  # a steady trickle, not a flood

    nursery.start_soon(publish)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATWATCH_")}
    db_url = f"sqlite:///{first.db_path}"
    with trio.fail_after(30):
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "app",
                "sessions",
                "revoke",
                seed.token,
                "--database-url",
                db_url,
            ],
            env=env,
            capture_stderr=True,
        )
    assert done.returncode == 0
    for stream in streams:
        events = _events(await _rest_of(stream, limit=8))
        assert events[-1] == ("error", "session revoked")
        assert ("error", "session revoked") not in events[:-1]
        await stream.aclose()
    # Another session of the same user goes on receiving.
    with trio.fail_after(5):
        assert (await bystander.next_frame() or b"").startswith(b'data: {"event":"token"')
    publishing.cancel()
    bystander.abort()
    await pub.aclose()
    for svc in (first, second):
        await svc.store.aclose()
        svc.shutdown.set()


async def test_an_expiring_session_ends_its_streams(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path)
    (seed,) = await svc.seed()
    token = await svc.store.create_session(seed.user_id, ttl=3.0)
    stream = await _open(svc, seed.conversation_id, token)
    events = _events(await _rest_of(stream, limit=15))
    assert events == [("error", "session expired")]
    await stream.aclose()
    await svc.store.aclose()
    svc.shutdown.set()


class _Store:
    """A store whose answer the test sets: a definite one, or an outage."""

    def __init__(self) -> None:
        self.answer: dict[str, str] | None = None
        self.asked = 0

    async def ended_sessions(self, token_hashes: list[str]) -> dict[str, str]:
        self.asked += 1
        if self.answer is None:
            raise StoreUnavailable("database is gone")
        return {h: r for h, r in self.answer.items() if h in token_hashes}


async def test_a_store_outage_ends_nothing_a_definite_answer_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = _Store()
    async with open_hub(FakeBus(), buffer=8, max_payload=1024, keepalive=1000.0) as hub:
        revoked = hub.join(CID, "revoked-session")
        kept = hub.join(CID, "valid-session")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.admit, revoked)
            nursery.start_soon(hub.admit, kept)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_revoked_sessions, store, hub, 2.0)
            await trio.sleep(61)  # thirty checks, every one an outage
            assert store.asked == 30
            assert revoked.outbox.receive_nowait() == sse.OK
            assert revoked in revoked.topic.attached
            store.answer = {"revoked-session": "revoked"}
            await trio.sleep(2)  # the next check
            nursery.cancel_scope.cancel()
        assert revoked.outbox.receive_nowait() == sse.error_frame("session revoked")
        assert revoked not in revoked.topic.attached
        assert kept.outbox.receive_nowait() == sse.OK
        assert kept.attached
        hub.leave(revoked)
        hub.leave(kept)


async def test_a_watcher_ended_before_admission_never_gets_ok() -> None:
    bus = FakeBus()
    bus.gate = trio.Event()  # the subscription is not confirmed yet
    async with open_hub(bus, buffer=8, max_payload=1024, keepalive=1000.0) as hub:
        w = hub.join(CID, "revoked-session")
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hub.admit, w)
                await trio.testing.wait_all_tasks_blocked()
                assert hub.end_sessions({"revoked-session": b"final"}) == 1
                bus.gate.set()
        assert w.outbox.receive_nowait() == b"final"
        assert not w.attached
        bus.deliver(f"chat.chunk.{CID}", b'{"chunk_type": "token"}')
        hub.leave(w)
