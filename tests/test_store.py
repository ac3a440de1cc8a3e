"""The SQLite store, on a real file."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from app import service
from app.auth import hash_token
from app.config import Settings
from app.errors import NotFound, StoreUnavailable, UsageError
from app.store import Access, SQLiteStore, open_store, sqlite_path
from tests.conftest import Service, watch_path
from tests.sseclient import get, request

T = TypeVar("T")


async def test_authorize_grants_only_the_owner(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    alice, bob = await store.add_user("alice"), await store.add_user("bob")
    token = await store.create_session(alice)
    mine = await store.create_conversation(alice, "t")
    theirs = await store.create_conversation(bob)
    assert (await store.authorize(token, mine)).access is Access.GRANTED
    assert (await store.authorize(token, theirs)).access is Access.NOT_FOUND
    assert (await store.authorize(token, None)).access is Access.NOT_FOUND
    assert (await store.authorize("nope", mine)).access is Access.UNAUTHORIZED
    await store.revoke_session(token)
    assert (await store.authorize(token, mine)).access is Access.UNAUTHORIZED
    with pytest.raises(NotFound):
        await store.revoke_session("never-issued")
    with pytest.raises(NotFound):
        await store.create_session("no-such-user")
    await store.aclose()


async def test_concurrent_checks_survive_a_cancelled_leader(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    user = await store.add_user("u")
    token = await store.create_session(user)
    cid = await store.create_conversation(user)
    results: list[Access] = []

    async def check() -> None:
        results.append((await store.authorize(token, cid)).access)

    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            (await store.authorize(token, cid)).access  # ruff: ignore[useless-expression]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()  # the leader is in its thread call
            for _ in range(50):
                nursery.start_soon(check)
            await trio.testing.wait_all_tasks_blocked()
            leader_scope.cancel()  # its client left: the others must still be answered
    # Whether or not the leader's own answer arrived before its cancellation, the
    # fifty requests that queued behind it were all answered.
    assert results == [Access.GRANTED] * 50
    await store.aclose()


async def test_unreadable_database_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    store = SQLiteStore(tmp_path / "dir.db")
    with pytest.raises(StoreUnavailable):
        await store.authorize("t", None)
    assert await store.ping() is False
    await store.aclose()


def test_database_urls() -> None:
    assert sqlite_path(None) == Path("chatwatch.db")
    assert sqlite_path("sqlite:///tmp/x.db") == Path("tmp/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("plain.db") == Path("plain.db")
    with pytest.raises(ValueError, match="postgresql"):
        sqlite_path("postgresql://localhost/test")


class _FailingStore(SQLiteStore):
    """Fails every query after a checkpoint, with an error the store did not foresee."""

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        await trio.lowlevel.checkpoint()  # the others queue behind the leader meanwhile
        raise OSError(13, "Permission denied", str(self._path))


async def test_every_waiter_is_answered_whatever_the_batch_raises(tmp_path: Path) -> None:
    store = _FailingStore(tmp_path / "s.db")
    outcomes: list[str] = []

    async def check() -> None:
        try:
            await store.authorize("token", None)
        except StoreUnavailable:
            outcomes.append("unavailable")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(check)
    assert outcomes == ["unavailable"] * 50
    await store.aclose()


async def test_aclose_waits_for_connections_in_threads_and_closes_them(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.add_user("u")
    in_thread = threading.Event()
    release = threading.Event()
    used: list[sqlite3.Connection] = []

    def slow(c: sqlite3.Connection) -> None:
        used.append(c)
        in_thread.set()
        release.wait(10)

    closed = trio.Event()

    async def close() -> None:
        await store.aclose()
        closed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, slow)
            await trio.to_thread.run_sync(in_thread.wait)
            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # still waiting for the query in its thread
            release.set()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        used[0].execute("SELECT 1")


async def test_aclose_past_its_grace_leaves_the_returning_call_to_close(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.add_user("u")
    in_thread = threading.Event()
    release = threading.Event()
    used: list[sqlite3.Connection] = []

    def slow(c: sqlite3.Connection) -> None:
        used.append(c)
        in_thread.set()
        release.wait(10)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, slow)
            await trio.to_thread.run_sync(in_thread.wait)
            await store.aclose(grace=0)
            release.set()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        used[0].execute("SELECT 1")


async def test_no_query_after_aclose(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    user = await store.add_user("u")
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.add_user("v")
    with pytest.raises(StoreUnavailable):
        await store.authorize("t", None)
    with pytest.raises(StoreUnavailable):
        await store.create_session(user)


async def test_a_deleted_database_is_an_outage_not_a_new_empty_one(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with open_store(f"sqlite:///{db}") as store:
        user = await store.add_user("u")
        token = await store.create_session(user)
        for name in ("s.db", "s.db-wal", "s.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        for _ in range(3):  # the broken connection is dropped; no new one may recreate
            with pytest.raises(StoreUnavailable):
                await store.authorize(token, None)
        assert await store.ping() is False
        assert not db.exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///:memory:", "not a database file path"),
        ("sqlite://", "not a database file path"),
        ("{tmp}", "is a directory"),
        ("{tmp}/missing/x.db", "does not exist"),
        ("{tmp}/garbage.db", "cannot use"),
        ("postgresql://localhost/x", "unsupported database URL scheme"),
    ],
)
async def test_a_database_that_can_never_open_is_refused_at_start(
    tmp_path: Path, url: str, message: str
) -> None:
    (tmp_path / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match=message) as info:
        async with open_store(url.format(tmp=tmp_path)):
            pass
    assert str(info.value).startswith("--database-url: ")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file")
async def test_a_database_without_permission_is_refused_at_start(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UsageError, match="cannot open"):
        async with open_store(f"sqlite:///{locked}/x.db"):
            pass


async def test_ended_sessions_names_revoked_expired_and_deleted(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    user = await store.add_user("u")
    valid = await store.create_session(user)
    revoked = await store.create_session(user)
    expired = await store.create_session(user, ttl=-1)
    await store.revoke_session(revoked)
    hashes = [hash_token(t) for t in (valid, revoked, expired, "never-issued")]
    assert await store.ended_sessions(hashes) == {
        hashes[1]: "revoked",
        hashes[2]: "expired",
        hashes[3]: "revoked",
    }
    assert await store.ended_sessions([]) == {}
    await store.aclose()


async def test_a_database_deleted_under_the_server_answers_503_and_stays_gone(
    svc: Service,
) -> None:
    (seed,) = await svc.seed()
    path = watch_path(seed.conversation_id)
    with trio.fail_after(10):
        stream = await request(svc.port, path, token=seed.token)
    assert stream.status == 200  # the server's connections are open and pooled
    stream.abort()
    for suffix in ("", "-wal", "-shm"):
        svc.db_path.with_name(svc.db_path.name + suffix).unlink(missing_ok=True)
    for _ in range(3):  # each broken connection is dropped; none may recreate the file
        with trio.fail_after(10):
            status, _, body = await get(svc.port, path, token=seed.token)
        assert (status, body) == (503, b'{"error": "unavailable"}')
    assert not svc.db_path.exists()


async def test_the_service_refuses_an_unusable_database_before_starting(tmp_path: Path) -> None:
    settings = Settings(bind="127.0.0.1:0", database_url=f"sqlite:///{tmp_path}")
    with trio.fail_after(10), pytest.raises(UsageError, match="is a directory"):
        await service.run(settings, handle_signals=False)
