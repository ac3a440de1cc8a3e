"""The SQLite store, on a real file."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from app.errors import NotFound, StoreUnavailable
from app.store import Access, SQLiteStore, sqlite_path


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
