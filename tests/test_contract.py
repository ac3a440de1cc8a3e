"""Every row of the contract's endpoint table, over real sockets."""

from __future__ import annotations

import pytest
import trio

from app import auth
from tests.conftest import Service, new_id, start_service, watch_path
from tests.natsproc import NatsProcess
from tests.sseclient import get, request

NOT_FOUND = b'{"error": "not_found"}'
UNAUTHORIZED = b'{"error": "unauthorized"}'


async def test_no_credentials_is_401(svc: Service) -> None:
    (seed,) = await svc.seed()
    status, headers, body = await get(svc.port, watch_path(seed.conversation_id))
    assert (status, body) == (401, UNAUTHORIZED)
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer nope",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer  ",
        "bearer",
        "Token abc",
        "Bearer a b",
    ],
)
async def test_unknown_or_malformed_credentials_are_401(svc: Service, authorization: str) -> None:
    (seed,) = await svc.seed()
    status, _, body = await get(
        svc.port, watch_path(seed.conversation_id), headers={"Authorization": authorization}
    )
    assert (status, body) == (401, UNAUTHORIZED)


@pytest.mark.parametrize("cookie", ["chatwatch_session=", "chatwatch_session", "=;;=", "a=b"])
async def test_malformed_cookies_are_401(svc: Service, cookie: str) -> None:
    (seed,) = await svc.seed()
    status, _, body = await get(
        svc.port, watch_path(seed.conversation_id), headers={"Cookie": cookie}
    )
    assert (status, body) == (401, UNAUTHORIZED)


async def test_expired_session_is_401(svc: Service) -> None:
    (seed,) = await svc.seed()
    # Expired the moment it is made (a session is valid while expires_at > now): no
    # waiting on the wall clock.
    token = await svc.store.create_session(seed.user_id, ttl=0)
    status, _, body = await get(svc.port, watch_path(seed.conversation_id), token=token)
    assert (status, body) == (401, UNAUTHORIZED)


async def test_revoked_session_is_401(svc: Service) -> None:
    (seed,) = await svc.seed()
    await svc.store.revoke_session(seed.token)
    status, _, body = await get(svc.port, watch_path(seed.conversation_id), token=seed.token)
    assert (status, body) == (401, UNAUTHORIZED)


async def test_tokens_are_stored_hashed(svc: Service) -> None:
    (seed,) = await svc.seed()
    raw = svc.db_path.read_bytes()
    assert seed.token.encode() not in raw
    wal = svc.db_path.with_name(svc.db_path.name + "-wal")
    if wal.exists():
        assert seed.token.encode() not in wal.read_bytes()
    assert len(seed.token) >= 43
    assert auth.hash_token(seed.token) != seed.token


BAD_IDS = [
    "not-a-uuid",
    "0123456789abcdef0123456789abcdef",  # 32 bare hex digits
    "{01234567-89ab-cdef-0123-456789abcdef}",
    "urn:uuid:01234567-89ab-cdef-0123-456789abcdef",
    "01234567-89ab-cdef-0123-456789abcdeg",
    "01234567-89ab-cdef-0123-456789abcde",
    "01234567-89ab-cdef-0123-456789abcdef0",
    "*",
    "%3E",
    "chat.%3E",
    "01234567-89ab-cdef-0123-456789abcdef.x",
    "01234567-89ab-cdef-0123-45678%2A",
    "%20" * 36,
    "01234567-89ab-cdef-0123-456789abcde%0A",
    "01234567-89ab-cdef-0123-456789abcdef%0A",
    "01234567-89ab-cdef-0123-456789abcdef%0D%0A",
    "01234567-89ab-cdef-0123-456789abcdef%00",
    "01234567%2D89ab-cdef-0123-456789abcdef%2F",
    "a" * 5000,
]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_ids_are_404_and_never_subscribe(svc: Service, bad: str) -> None:
    (seed,) = await svc.seed()
    before = await svc.nats.chat_subscriptions_async()
    status, headers, body = await get(
        svc.port, f"/api/ai/conversations/{bad}/watch", token=seed.token
    )
    assert (status, body) == (404, NOT_FOUND)
    assert headers["content-type"] == "application/json"
    assert await svc.nats.chat_subscriptions_async() == before


async def test_missing_and_foreign_conversations_are_byte_identical_404(svc: Service) -> None:
    (mine,) = await svc.seed()
    (theirs,) = await svc.seed()
    missing = await get(svc.port, watch_path(new_id()), token=mine.token)
    foreign = await get(svc.port, watch_path(theirs.conversation_id), token=mine.token)
    bad = await get(svc.port, watch_path("nope"), token=mine.token)
    assert missing[0] == foreign[0] == bad[0] == 404
    assert missing[2] == foreign[2] == bad[2] == NOT_FOUND
    drop = {"date"}
    assert {k: v for k, v in missing[1].items() if k not in drop} == {
        k: v for k, v in foreign[1].items() if k not in drop
    }


async def test_ok_headers_and_ok_comment_with_bearer_and_cookie(svc: Service) -> None:
    (seed,) = await svc.seed()
    for kw in ({"token": seed.token}, {"cookie": seed.token}):
        response = await request(svc.port, watch_path(seed.conversation_id), **kw)  # type: ignore[arg-type]
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "server" not in response.headers  # no make or version given away
        assert await response.next_frame() == b":ok"
        await response.aclose()


async def test_uppercase_id_watches_the_lowercase_conversation(svc: Service) -> None:
    (seed,) = await svc.seed()
    response = await request(svc.port, watch_path(seed.conversation_id.upper()), token=seed.token)
    assert response.status == 200
    assert await response.next_frame() == b":ok"
    assert await svc.nats.chat_subscriptions_async() == [f"chat.*.{seed.conversation_id}"]
    pub = await svc.publisher()
    await pub.publish(f"chat.message.{seed.conversation_id}", b'{"m":1}')
    assert await response.next_frame() == b'data: {"event":"message","data":{"m":1}}'
    await response.aclose()
    await pub.aclose()


async def test_store_unreachable_is_503_with_retry_after(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: object
) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    svc = await start_service(nursery, nats, base)
    (seed,) = await svc.seed()
    open_stream = await request(svc.port, watch_path(seed.conversation_id), token=seed.token)
    assert await open_stream.next_frame() == b":ok"
    # The database file becomes unreadable: a directory where the file was.
    for suffix in ("", "-wal", "-shm"):
        p = svc.db_path.with_name(svc.db_path.name + suffix)
        if p.exists():
            p.unlink()
    svc.db_path.mkdir()
    status, headers, body = await get(svc.port, watch_path(seed.conversation_id), token=seed.token)
    assert (status, body) == (503, b'{"error": "unavailable"}')
    assert headers["retry-after"].isdigit()
    status, _, _ = await get(svc.port, "/readyz")
    assert status == 503
    status, _, _ = await get(svc.port, "/healthz")
    assert status == 200
    # The stream opened before the outage goes on.
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{seed.conversation_id}", b'{"chunk_type":"token"}')
    with trio.fail_after(5):
        assert await open_stream.next_frame() == (
            b'data: {"event":"token","data":{"chunk_type":"token"}}'
        )
    open_stream.abort()
    await pub.aclose()


async def test_unknown_routes_and_methods_are_json(svc: Service) -> None:
    status, headers, body = await get(svc.port, "/nope")
    assert (status, body) == (404, NOT_FOUND)
    status, headers, body = await get(svc.port, "/healthz", method="DELETE")
    assert status == 405
    assert headers["content-type"] == "application/json"
