"""Health, readiness, metrics, the OpenAPI document, limits and odd HTTP clients."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio

from app.openapi import SPEC
from tests.conftest import Service, chunk, start_service, watch_path
from tests.natsproc import NatsProcess
from tests.polling import poll_until
from tests.sseclient import Response, get, request
from tests.streams import parse, watch


async def test_healthz_and_readyz(svc: Service) -> None:
    status, _headers, body = await get(svc.port, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})

    async def nats_up() -> bool:
        # The fixture waits until nats-server counts the service's connection; the
        # service's client says "connected" a handshake later.
        return bool(json.loads((await get(svc.port, "/readyz"))[2])["nats"])

    await poll_until(nats_up)
    status, _, body = await get(svc.port, "/readyz")
    assert (status, json.loads(body)) == (200, {"nats": True, "store": True, "history": False})


async def test_metrics_count_watchers_and_events(svc: Service) -> None:
    (seed,) = await svc.seed()
    w = await watch(svc, seed.conversation_id, seed.token)
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("token"))
    with trio.fail_after(5):
        await w.next_frame()
    status, headers, body = await get(svc.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "chatwatch_watchers 1.0" in text
    assert "chatwatch_conversations 1.0" in text
    assert "chatwatch_events_in_total 1.0" in text
    assert "chatwatch_events_out_total 1.0" in text
    assert "chatwatch_nats_connected 1.0" in text
    assert re.search(r"^chatwatch_trio_tasks [1-9][0-9]*\.0$", text, re.M)
    assert re.search(r"^process_open_fds [1-9]", text, re.M)
    w.abort()
    await pub.aclose()


async def test_openapi_document_lists_the_served_routes(svc: Service) -> None:
    status, _headers, body = await get(svc.port, "/openapi.json")
    assert status == 200
    doc = json.loads(body)
    assert doc == json.loads(json.dumps(SPEC))
    assert doc["openapi"].startswith("3.1")
    for path in doc["paths"]:
        if "{" in path:
            continue
        status, _, _ = await get(svc.port, path)
        assert status in (200, 503), path


async def test_http_10_client_gets_the_stream_until_close(svc: Service) -> None:
    (seed,) = await svc.seed()
    response = await request(
        svc.port, watch_path(seed.conversation_id), token=seed.token, version="HTTP/1.0"
    )
    assert response.status == 200
    assert "chunked" not in response.headers.get("transfer-encoding", "")
    assert await response.next_frame() == b":ok"
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("token", v=1))
    with trio.fail_after(5):
        assert parse(await response.next_frame() or b"")[1] == {"chunk_type": "token", "v": 1}
    response.abort()
    await pub.aclose()


async def test_pipelined_requests_are_answered_in_order(svc: Service) -> None:
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    data = b""
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", svc.port)
        await stream.send_all(
            req + req + b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        while chunk_ := await stream.receive_some(65536):
            data += chunk_
    assert data.count(b"HTTP/1.1 200") == 2
    assert data.index(b"HTTP/1.1 404") > data.rindex(b"HTTP/1.1 200")
    await stream.aclose()


async def test_oversized_request_head_is_rejected(svc: Service) -> None:
    response = await request(svc.port, "/healthz", headers={"X-Big": "a" * 70000})
    assert response.status in (400, 413, 431)
    await response.aclose()


async def test_watcher_limits_answer_429_with_retry_after(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, max_watchers=3, max_watchers_per_session=2)
    a, b = await svc.seed(), await svc.seed()
    streams: list[Response] = [
        await watch(svc, a[0].conversation_id, a[0].token),
        await watch(svc, a[0].conversation_id, a[0].token),
    ]
    status, headers, body = await get(svc.port, watch_path(a[0].conversation_id), token=a[0].token)
    assert (status, json.loads(body)) == (429, {"error": "too_many_watchers"})
    assert headers["retry-after"].isdigit()
    streams.append(await watch(svc, b[0].conversation_id, b[0].token))
    status, _, _ = await get(svc.port, watch_path(b[0].conversation_id), token=b[0].token)
    assert status == 429  # the process limit
    streams[0].abort()

    async def slot_freed() -> bool:  # once the server noticed the close
        again = await request(svc.port, watch_path(b[0].conversation_id), token=b[0].token)
        again.abort()
        return again.status == 200

    await poll_until(slot_freed)
    for s in streams:
        s.abort()
    await svc.store.aclose()


async def test_payload_over_the_cap_is_an_error_event_not_a_broken_stream(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, max_payload=1000)
    (seed,) = await svc.seed()
    w = await watch(svc, seed.conversation_id, seed.token)
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{seed.conversation_id}", b"x" * 5000)
    await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("done"))
    with trio.fail_after(5):
        event, data = parse(await w.next_frame() or b"")
        assert event == "error"
        assert "5000 bytes" in str(data)
        assert parse(await w.next_frame() or b"")[0] == "done"
    w.abort()
    await pub.aclose()
    await svc.store.aclose()
