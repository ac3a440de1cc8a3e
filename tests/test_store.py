"""The session store on both backends: SQLite on a real file, PostgreSQL on a real
server that the test session owns (tests/pgproc.py).

Every test takes the `backend` fixture, so the whole module runs once per backend.
The few tests about one backend's own mechanics (a SQLite file deleted under the
server, PostgreSQL's migrations and outage) skip on the other with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import trio
import trio.testing

from app import service
from app.auth import hash_token
from app.cli import main
from app.config import Settings
from app.errors import NotFound, StoreUnavailable, UsageError
from app.pgstore import MIGRATIONS, PostgresStore, check_url
from app.store import Access, SQLiteStore, Store, open_store, sqlite_path
from tests.conftest import Service, watch_path
from tests.natsproc import NatsProcess
from tests.pgproc import PostgresProcess, missing_reason
from tests.polling import poll_until
from tests.ports import closed_port
from tests.rawnats import RawNats
from tests.sseclient import get, request
from tests.streams import parse, watch_port

T = TypeVar("T")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresProcess | None]:
    """The session's PostgreSQL, started on first use; None where it cannot run."""
    if missing_reason() is not None:
        yield None
        return
    server = PostgresProcess()
    server.start()
    yield server
    server.destroy()


@dataclass
class Backend:
    name: str
    tmp: Path
    pg: PostgresProcess | None

    async def url(self) -> str:
        """A new, empty database."""
        if self.pg is None:
            return f"sqlite:///{self.tmp / 's.db'}"
        if not self.pg.running:  # a test stopped it and failed before restarting it
            await trio.to_thread.run_sync(self.pg.start)
        return await self.pg.new_database_async()

    async def store(self) -> Store:
        if self.pg is None:
            return SQLiteStore(self.tmp / "s.db")
        return PostgresStore(await self.url())

    def unreachable(self) -> Store:
        """A store whose database can never answer."""
        if self.pg is None:
            (self.tmp / "dir.db").mkdir()
            return SQLiteStore(self.tmp / "dir.db")
        with closed_port() as port:
            return PostgresStore(f"postgresql://nobody@127.0.0.1:{port}/x?connect_timeout=2")


def only(name: str) -> pytest.MarkDecorator:
    """A test of one backend's own mechanics: it runs on that backend alone."""
    return pytest.mark.parametrize("backend", [name], indirect=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, pg_server: PostgresProcess | None
) -> Backend:
    if request.param == "postgresql":
        if pg_server is None:
            pytest.skip(f"no PostgreSQL to test against: {missing_reason()}")
        return Backend("postgresql", tmp_path, pg_server)
    return Backend("sqlite", tmp_path, None)


def is_closed(conn: Any) -> bool:
    if isinstance(conn, sqlite3.Connection):
        try:
            conn.execute("SELECT 1")
        except sqlite3.ProgrammingError as exc:
            return "closed" in str(exc)
        return False
    return bool(conn.closed)


async def test_authorize_grants_only_the_owner(backend: Backend) -> None:
    store = await backend.store()
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


async def test_seed_inserts_given_ids_and_is_idempotent(backend: Backend) -> None:
    store = await backend.store()
    cid = "0123ABCD-89ab-cdef-0123-456789abcdef"
    for _ in range(2):  # the second time changes nothing
        await store.seed({"user-1": "one"}, {"tok-1": "user-1"}, {cid: "user-1"})
    grant = await store.authorize("tok-1", cid.lower())
    assert (grant.access, grant.user_id) == (Access.GRANTED, "user-1")
    await store.aclose()


async def test_concurrent_checks_survive_a_cancelled_leader(backend: Backend) -> None:
    store = await backend.store()
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


async def test_unreadable_database_is_unavailable(backend: Backend) -> None:
    store = backend.unreachable()
    with trio.fail_after(10), pytest.raises(StoreUnavailable):
        await store.authorize("t", None)
    assert await store.ping() is False
    await store.aclose()


def test_database_urls(backend: Backend) -> None:
    if backend.name == "postgresql":
        params = check_url("postgresql://u@db.example:6432/chat?sslmode=require")
        assert params["host"] == "db.example"
        assert params["port"] == "6432"
        assert params["connect_timeout"] == "3"  # ours, unless the URL says
        assert check_url("postgres://h/d?connect_timeout=9")["connect_timeout"] == "9"
        return
    assert sqlite_path(None) == Path("chatwatch.db")
    assert sqlite_path("sqlite:///tmp/x.db") == Path("tmp/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("plain.db") == Path("plain.db")
    with pytest.raises(ValueError, match="postgresql"):
        sqlite_path("postgresql://localhost/test")


async def _failing_run(fn: Callable[[Any], T]) -> T:
    """Fails every query after a checkpoint, with an error the store did not foresee."""
    await trio.lowlevel.checkpoint()  # the others queue behind the leader meanwhile
    raise OSError(13, "Permission denied", "the database")


async def test_every_waiter_is_answered_whatever_the_batch_raises(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await backend.store()
    monkeypatch.setattr(store, "_run", _failing_run)
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


async def test_aclose_waits_for_connections_in_threads_and_closes_them(backend: Backend) -> None:
    store = await backend.store()
    await store.add_user("u")
    in_thread = threading.Event()
    release = threading.Event()
    used: list[Any] = []

    def slow(c: Any) -> None:
        used.append(c)
        in_thread.set()
        release.wait(10)

    closed = trio.Event()

    async def close() -> None:
        await store.aclose()
        closed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, slow)  # type: ignore[attr-defined]
            await trio.to_thread.run_sync(in_thread.wait)
            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # still waiting for the query in its thread
            release.set()
    assert is_closed(used[0])


async def test_aclose_past_its_grace_leaves_the_returning_call_to_close(backend: Backend) -> None:
    store = await backend.store()
    await store.add_user("u")
    in_thread = threading.Event()
    release = threading.Event()
    used: list[Any] = []

    def slow(c: Any) -> None:
        used.append(c)
        in_thread.set()
        release.wait(10)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, slow)  # type: ignore[attr-defined]
            await trio.to_thread.run_sync(in_thread.wait)
            await store.aclose(grace=0)
            release.set()
    assert is_closed(used[0])


async def test_no_query_after_aclose(backend: Backend) -> None:
    store = await backend.store()
    user = await store.add_user("u")
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.add_user("v")
    with pytest.raises(StoreUnavailable):
        await store.authorize("t", None)
    with pytest.raises(StoreUnavailable):
        await store.create_session(user)


@only("sqlite")  # a database file deleted under the server
async def test_a_deleted_database_is_an_outage_not_a_new_empty_one(
    backend: Backend, tmp_path: Path
) -> None:
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
        ("mysql://localhost/x", "unsupported database URL scheme"),
    ],
)
@only("sqlite")  # SQLite paths (PostgreSQL: test_a_malformed_postgresql_url_...)
async def test_a_database_that_can_never_open_is_refused_at_start(
    backend: Backend, tmp_path: Path, url: str, message: str
) -> None:
    (tmp_path / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match=message) as info:
        async with open_store(url.format(tmp=tmp_path)):
            pass
    assert str(info.value).startswith("--database-url: ")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file")
@only("sqlite")  # file permissions
async def test_a_database_without_permission_is_refused_at_start(
    backend: Backend, tmp_path: Path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UsageError, match="cannot open"):
        async with open_store(f"sqlite:///{locked}/x.db"):
            pass


async def test_ended_sessions_names_revoked_expired_and_deleted(backend: Backend) -> None:
    store = await backend.store()
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


@only("sqlite")  # a database file deleted under the server
async def test_a_database_deleted_under_the_server_answers_503_and_stays_gone(
    backend: Backend, svc: Service
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


async def test_the_service_refuses_an_unusable_database_before_starting(
    backend: Backend, tmp_path: Path
) -> None:
    url, message = f"sqlite:///{tmp_path}", "is a directory"
    if backend.name == "postgresql":
        url, message = "postgresql://u@db:70000/chat", "not 1-65535"
    settings = Settings(bind="127.0.0.1:0", database_url=url)
    with trio.fail_after(10), pytest.raises(UsageError, match=message):
        await service.run(settings, handle_signals=False)


async def test_admin_commands_work_on_the_backend(backend: Backend) -> None:
    url = await backend.url()

    def cli(*argv: str) -> str:
        # `main` runs its own trio loop: in a thread, as a command line would.
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main([*argv, "--database-url", url], env={})
        assert code == 0, argv
        return buffer.getvalue().strip()

    user = await trio.to_thread.run_sync(cli, "users", "add", "alice")
    token = await trio.to_thread.run_sync(partial(cli, "sessions", "create", user))
    conversation = await trio.to_thread.run_sync(
        partial(cli, "conversations", "create", "--owner", user)
    )
    async with open_store(url) as store:
        assert (await store.authorize(token, conversation)).access is Access.GRANTED
        assert await trio.to_thread.run_sync(cli, "sessions", "revoke", token) == ""
        assert (await store.authorize(token, conversation)).access is Access.UNAUTHORIZED


async def test_concurrent_checks_are_answered_in_batches(backend: Backend) -> None:
    store = await backend.store()
    alice, bob = await store.add_user("alice"), await store.add_user("bob")
    tokens = [await store.create_session(alice) for _ in range(3)]
    mine, theirs = await store.create_conversation(alice), await store.create_conversation(bob)
    await store.revoke_session(tokens[2])
    cases = [
        (tokens[0], mine, Access.GRANTED),
        (tokens[1], theirs, Access.NOT_FOUND),
        (tokens[1], None, Access.NOT_FOUND),
        (tokens[2], mine, Access.UNAUTHORIZED),
        ("never-issued", mine, Access.UNAUTHORIZED),
    ] * 40
    got: dict[int, Access] = {}

    async def check(n: int, token: str, cid: str | None) -> None:
        got[n] = (await store.authorize(token, cid)).access

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for n, (token, cid, _) in enumerate(cases):
                nursery.start_soon(check, n, token, cid)
    assert [got[n] for n in range(len(cases))] == [want for _, _, want in cases]
    await store.aclose()


# ---------------------------------------------------------------- PostgreSQL only


def _schema_versions(url: str) -> list[int]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    return [int(v) for (v,) in rows]


@only("postgresql")  # versioned migrations (SQLite creates its schema in place)
async def test_three_instances_migrating_an_empty_database_at_once(backend: Backend) -> None:
    url = await backend.url()
    stores = [PostgresStore(url) for _ in range(3)]
    users: list[str] = []

    async def start(store: PostgresStore) -> None:
        users.append(await store.add_user("u"))  # the first query migrates

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(start, store)
    assert len(users) == 3
    assert await trio.to_thread.run_sync(_schema_versions, url) == [v for v, _ in MIGRATIONS]
    for store in stores:  # every instance sees every other's rows
        token = await store.create_session(users[0])
        assert (await stores[0].authorize(token, None)).access is Access.NOT_FOUND
    for store in stores:
        await store.aclose()
    # A later start finds the schema current and applies nothing.
    again = PostgresStore(url)
    assert await again.ping()
    assert await trio.to_thread.run_sync(_schema_versions, url) == [v for v, _ in MIGRATIONS]
    await again.aclose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://[bad", "not a valid PostgreSQL URL"),
        ("postgresql://u@db:notaport/chat", "port 'notaport' is not 1-65535"),
        ("postgresql://u@db:70000/chat", "port '70000' is not 1-65535"),
        ("postgresql://db/chat?nonsense=1", "invalid URI query parameter"),
        ("postgresql://db/chat?sslmode=sometimes", "sslmode 'sometimes'"),
        ("postgres://u:p%zz@db/chat", "invalid percent-encoded token"),
    ],
)
@only("postgresql")  # PostgreSQL URLs
def test_a_malformed_postgresql_url_is_a_usage_error(
    backend: Backend, capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    code = main(["users", "add", "x"], env={"CHATWATCH_DATABASE_URL": url})
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("chatwatch: CHATWATCH_DATABASE_URL: ")
    assert message in err
    assert err.count("\n") == 1


@only("postgresql")  # a database server that does not answer
def test_an_unreachable_postgresql_is_a_runtime_error_for_admin_commands(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    with closed_port() as port:
        url = f"postgresql://u@127.0.0.1:{port}/chat?connect_timeout=2"
        code = main(["users", "add", "x", "--database-url", url], env={})
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.startswith("chatwatch: ")
    assert err.count("\n") == 1


async def _serve(nursery: trio.Nursery, nats: NatsProcess, url: str) -> int:
    settings = Settings(
        bind="127.0.0.1:0",
        database_url=url,
        nats_urls=(nats.url,),
        history="off",
        shutdown_grace=1.0,
    )
    with trio.fail_after(30):
        binds = await nursery.start(partial(service.run, settings, handle_signals=False))
    return int(binds[0].rsplit(":", 1)[1])


async def _ready(port: int) -> tuple[int, bytes]:
    status, _, body = await get(port, "/readyz")
    return status, body


@only("postgresql")  # a database server that does not answer at start
async def test_a_service_starts_with_its_database_unreachable_and_answers_503(
    backend: Backend, nursery: trio.Nursery, nats: NatsProcess
) -> None:
    with closed_port() as db_port:
        port = await _serve(nursery, nats, f"postgresql://u@127.0.0.1:{db_port}/x")

        async def nats_up() -> bool:  # NATS connects by itself after the start
            return (await _ready(port))[1].startswith(b'{"nats": true')

        await poll_until(nats_up)
        assert await _ready(port) == (503, b'{"nats": true, "store": false, "history": false}')
        status, headers, body = await get(port, watch_path(str(uuid.uuid4())), token="t")
        assert (status, body) == (503, b'{"error": "unavailable"}')
        assert headers["retry-after"] == "5"


@only("postgresql")  # stopping and restarting the database server
async def test_a_database_outage_answers_503_keeps_open_streams_and_recovers(
    backend: Backend, nursery: trio.Nursery, nats: NatsProcess
) -> None:
    assert backend.pg is not None
    pg = backend.pg
    url = await backend.url()
    store = PostgresStore(url)
    user = await store.add_user("u")
    token = await store.create_session(user)
    cid = await store.create_conversation(user)
    await store.aclose()
    port = await _serve(nursery, nats, url)

    async def ready() -> bool:
        return (await _ready(port))[0] == 200

    await poll_until(ready)
    assert await _ready(port) == (200, b'{"nats": true, "store": true, "history": false}')
    stream = await watch_port(port, cid, token)
    publisher = await RawNats.connect(nats.client_port)
    try:
        await trio.to_thread.run_sync(pg.stop)
        try:
            assert await _ready(port) == (503, b'{"nats": true, "store": false, "history": false}')
            status, headers, body = await get(port, watch_path(cid), token=token)
            assert (status, body) == (503, b'{"error": "unavailable"}')
            assert headers["retry-after"] == "5"
            # The open stream goes on: a revocation check that cannot be answered
            # ends nothing, and events still arrive.
            await publisher.publish(f"chat.chunk.{cid}", b'{"chunk_type":"token","text":"hi"}')
            assert parse(await stream.next_frame() or b"") == (
                "token",
                {"chunk_type": "token", "text": "hi"},
            )
        finally:
            await trio.to_thread.run_sync(pg.start)
        # Back by itself: no restart of chatwatch.

        async def ready() -> bool:
            return (await _ready(port))[0] == 200

        await poll_until(ready, limit=30)
        again = await request(port, watch_path(cid), token=token)
        assert again.status == 200
        again.abort()
    finally:
        await publisher.aclose()
        stream.abort()


@only("postgresql")  # pooled connections that a database restart left stale
async def test_the_first_check_after_a_database_restart_succeeds(backend: Backend) -> None:
    assert backend.pg is not None
    pg = backend.pg
    store = PostgresStore(await backend.url(), pool_size=4)
    user = await store.add_user("u")
    token = await store.create_session(user)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:  # fill the pool: 4 open connections
            for _ in range(4):
                nursery.start_soon(store._run, lambda c: c.execute("SELECT pg_sleep(0.2)"))
    await trio.to_thread.run_sync(pg.stop)
    await trio.to_thread.run_sync(pg.start)
    # Every pooled connection is dead now; not one request may pay for that.
    with trio.fail_after(20):
        for _ in range(5):
            assert (await store.authorize(token, None)).access is Access.NOT_FOUND
            assert await store.ping()
    await store.aclose()
