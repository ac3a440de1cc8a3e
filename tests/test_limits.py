"""Admission limits: checked and taken in one step, released exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from app.http import create_app
from app.hub import open_hub
from app.limits import Admission
from app.store import SQLiteStore
from tests.conftest import start_service, watch_path
from tests.fakes import FakeBus
from tests.natsproc import NatsProcess
from tests.sseclient import Response, request


def test_admission_counts_both_limits_and_releases_once() -> None:
    admission = Admission(max_total=3, max_per_owner=2)
    a1, a2 = admission.try_reserve("a"), admission.try_reserve("a")
    assert a1 is not None
    assert a2 is not None
    assert admission.try_reserve("a") is None
    b = admission.try_reserve("b")
    assert b is not None
    assert admission.try_reserve("c") is None  # the process limit
    a1.release()
    a1.release()  # idempotent: the second call gives nothing back
    assert (admission.total, admission.of("a")) == (2, 1)
    c = admission.try_reserve("c")
    assert c is not None
    assert admission.try_reserve(None) is None
    for slot in (a2, b, c):
        slot.release()
    assert (admission.total, admission.of("a")) == (0, 0)


async def _burst(port: int, path: str, tokens: list[str]) -> tuple[list[int], list[Response]]:
    """Send every request at once; return the statuses and the open 200 streams."""
    statuses: list[int] = []
    streams: list[Response] = []

    async def one(token: str) -> None:
        response = await request(port, path, token=token)
        statuses.append(response.status)
        if response.status == 200:
            streams.append(response)
        else:
            await response.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(one, token)
    return statuses, streams


async def test_a_burst_never_passes_the_per_session_limit(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, max_watchers_per_session=5)
    (seed,) = await svc.seed()
    statuses, streams = await _burst(svc.port, watch_path(seed.conversation_id), [seed.token] * 60)
    assert sorted(statuses) == [200] * 5 + [429] * 55
    for stream in streams:
        stream.abort()
    await svc.store.aclose()
    svc.shutdown.set()


async def test_a_burst_never_passes_the_process_limit(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, max_watchers=20)
    (seed,) = await svc.seed()
    other = await svc.store.create_session(seed.user_id)
    statuses, streams = await _burst(
        svc.port, watch_path(seed.conversation_id), [seed.token, other] * 15
    )
    assert sorted(statuses) == [200] * 20 + [429] * 10
    for stream in streams:
        stream.abort()
    await svc.store.aclose()
    svc.shutdown.set()


async def test_a_request_cancelled_while_sending_the_head_gives_its_slot_back(
    tmp_path: Path,
) -> None:
    # Driven at the ASGI boundary, where "the client left while the head was being
    # sent" can be produced exactly: the head's send blocks, then the server reports
    # the disconnect, so Quart never enters the response body.
    store = SQLiteStore(tmp_path / "s.db")
    user = await store.add_user("u")
    token = await store.create_session(user)
    cid = await store.create_conversation(user)
    async with open_hub(FakeBus(), buffer=16, max_payload=1024, keepalive=15.0) as hub:
        app = create_app(
            hub=hub,
            store=store,
            is_nats_connected=lambda: True,
            max_watchers=1,
            max_watchers_per_session=1,
        )

        async def call(leave_during_head: bool) -> int:
            head_started = trio.Event()
            status: list[int] = []
            requested = False

            async def receive() -> dict[str, Any]:
                nonlocal requested
                if not requested:
                    requested = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await head_started.wait()
                if not leave_during_head:
                    await trio.sleep_forever()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                    head_started.set()
                    if leave_during_head:
                        await trio.sleep_forever()  # a stalled write, then the hang-up

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": watch_path(cid),
                "raw_path": watch_path(cid).encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [(b"authorization", f"Bearer {token}".encode())],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "extensions": {},
            }
            asgi: Any = app  # driven with plain dicts, not Quart's TypedDicts
            with trio.fail_after(10):
                if leave_during_head:
                    await asgi(scope, receive, send)
                else:
                    async with trio.open_nursery() as n:
                        n.start_soon(asgi, scope, receive, send)
                        await head_started.wait()
                        n.cancel_scope.cancel()  # a stream: cut once the head is out
            return status[0]

        for _ in range(3):
            assert await call(leave_during_head=True) == 200
        # The limit is one stream: each request above gave its place back.
        assert await call(leave_during_head=False) == 200
        assert hub.watchers == 0
    await store.aclose()
