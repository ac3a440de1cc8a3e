"""The session store: users, sessions (hashed tokens) and conversation ownership.

`Store` is the narrow surface the service uses; `SQLiteStore` is the default
implementation, `app.pgstore.PostgresStore` the one for a database that several
instances share; `open_store` picks one by the URL's scheme.
Every blocking call runs in a worker thread under the store's own CapacityLimiter, so
a slow disk never stalls the event loop and never takes more threads than the store's
connection pool has connections.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import AsyncGenerator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from app import auth
from app.errors import NotFound, StoreUnavailable, UsageError

log = logging.getLogger("chatwatch.store")

T = TypeVar("T")

DEFAULT_SESSION_TTL = 30 * 24 * 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users(id),
    title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user_id);
"""


class Access(enum.Enum):
    """What a watch request may do; the HTTP layer maps it to 401/404/200."""

    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    GRANTED = "granted"


@dataclass(frozen=True, slots=True)
class Grant:
    access: Access
    user_id: str | None = None
    token_hash: str | None = None


class Store(Protocol):
    """What the service needs from a session store."""

    async def authorize(self, token: str, conversation_id: str | None) -> Grant:
        """Check the session and, if `conversation_id` is given, that it owns it.

        Raises:
            StoreUnavailable: the database cannot be reached.
        """
        ...

    async def ping(self) -> bool: ...

    async def add_user(self, name: str) -> str: ...

    async def create_session(self, user_id: str, ttl: float = DEFAULT_SESSION_TTL) -> str: ...

    async def revoke_session(self, token: str) -> None: ...

    async def ended_sessions(self, token_hashes: Collection[str]) -> dict[str, str]:
        """Which of these sessions may no longer watch, and why, in one round trip.

        Returns token hash -> "revoked" or "expired"; a session that no longer exists
        counts as revoked. Valid sessions are left out.

        Raises:
            StoreUnavailable: no definite answer (open streams must not be ended).
        """
        ...

    async def create_conversation(self, owner_id: str, title: str = "") -> str: ...

    async def seed(
        self,
        users: dict[str, str],
        sessions: dict[str, str],
        conversations: dict[str, str],
    ) -> None: ...

    async def aclose(self, grace: float = 10.0) -> None:
        """Close every connection; calls after this raise StoreUnavailable."""
        ...


@dataclass(frozen=True, slots=True)
class SeedRows:
    """`Store.seed`'s arguments as table rows, the same for every backend.

    users: user id -> name; sessions: token -> user id (stored hashed);
    conversations: conversation id -> owner user id (stored lowercase).
    """

    users: list[tuple[str, str, float]]
    sessions: list[tuple[str, str, float, float]]
    conversations: list[tuple[str, str, float]]

    @classmethod
    def of(
        cls, users: dict[str, str], sessions: dict[str, str], conversations: dict[str, str]
    ) -> SeedRows:
        now = time.time()
        return cls(
            [(u, n, now) for u, n in users.items()],
            [(auth.hash_token(t), u, now + DEFAULT_SESSION_TTL, now) for t, u in sessions.items()],
            [(cid.lower(), o, now) for cid, o in conversations.items()],
        )


def check_database_url(text: str) -> None:
    """Refuse a URL that can never name a database (for the settings' parser).

    Raises:
        ValueError: naming the reason, one line.
    """
    from app import pgstore

    if pgstore.is_postgres_url(text):
        pgstore.check_url(text)
    else:
        sqlite_path(text)


def sqlite_path(database_url: str | None) -> Path:
    """``None`` -> ./chatwatch.db; ``sqlite:///x.db`` or a plain path -> that file."""
    if database_url is None:
        return Path("chatwatch.db")
    if database_url.startswith("sqlite:///"):
        return Path(database_url.removeprefix("sqlite:///"))
    if database_url.startswith("sqlite://"):
        return Path(database_url.removeprefix("sqlite://"))
    if "://" in database_url:
        raise ValueError(f"unsupported database URL scheme: {database_url.split('://')[0]}")
    return Path(database_url)


def check_database(database_url: str | None) -> Path | None:
    """Refuse, with one line, a database that can never work; create it otherwise.

    Run (in a thread) before anything starts: a path that cannot be opened is a
    mistake in the configuration, not an outage to answer with 503 forever. A
    PostgreSQL URL is only parsed (None is returned): a server that does not answer
    yet is an outage, and the service starts anyway.

    Raises:
        UsageError: naming --database-url and the reason.
    """
    from app import pgstore

    if pgstore.is_postgres_url(database_url):
        assert database_url is not None
        try:
            pgstore.check_url(database_url)
        except ValueError as exc:
            raise UsageError(f"--database-url: {exc}") from None
        return None
    try:
        path = sqlite_path(database_url)
    except ValueError as exc:
        raise UsageError(f"--database-url: {exc}") from None
    text = str(path)
    if text in ("", ".") or text == ":memory:" or text.startswith("file:"):
        # ":memory:" would give every pooled connection, and every worker, its own
        # empty database.
        raise UsageError(f"--database-url: {database_url!r} is not a database file path")
    if path.is_dir():
        raise UsageError(f"--database-url: {path} is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--database-url: directory {path.parent} does not exist")
    try:
        conn = _open(path, create=True)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise StoreUnavailable(f"database {path}: {exc}") from None
        raise UsageError(f"--database-url: cannot open {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"--database-url: cannot use {path}: {exc}") from None
    conn.close()
    return path


def _open(path: Path, *, create: bool) -> sqlite3.Connection:
    # Without `create`, a missing file is an error rather than a new empty database:
    # a file deleted under a running server must be an outage, not a silent reset.
    mode = "rwc" if create else "rw"
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class _AuthRequest:
    __slots__ = ("conversation_id", "done", "error", "grant", "token_hash")

    def __init__(self, token_hash: str, conversation_id: str | None) -> None:
        self.token_hash = token_hash
        self.conversation_id = conversation_id
        self.done = trio.Event()
        self.grant: Grant | None = None
        self.error: StoreUnavailable | None = None

    def fail(self, error: StoreUnavailable) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


# A session check's answer: (user id, the conversation's owner or None), or None when
# the session is unknown, revoked or expired.
_Row = tuple[str, str | None] | None


def _grant(row: _Row, req: _AuthRequest) -> Grant:
    if row is None:
        return Grant(Access.UNAUTHORIZED)
    user_id, owner = row
    if req.conversation_id is None or owner != user_id:
        return Grant(Access.NOT_FOUND, user_id, req.token_hash)
    return Grant(Access.GRANTED, user_id, req.token_hash)


class BatchedAuth:
    """Session checks that arrive together share one database round trip.

    A store implements `_authorize_batch`: answer every request of the batch (set
    `grant` and `done`, or `fail`).
    """

    def __init__(self) -> None:
        self._auth_queue: list[_AuthRequest] = []
        self._auth_leader = False

    async def _authorize_batch(self, batch: list[_AuthRequest]) -> None:
        raise NotImplementedError

    async def authorize(self, token: str, conversation_id: str | None) -> Grant:
        # Watch requests arrive in bursts (a deploy, a reconnect storm): concurrent
        # checks share one worker-thread round trip. The first caller runs batches
        # until none is left, shielded, so that its own cancellation (its client left)
        # never strands the others waiting on it.
        # Whatever a batch raises, every waiter is answered: none may wait forever on
        # a leader that has gone.
        req = _AuthRequest(auth.hash_token(token), conversation_id)
        self._auth_queue.append(req)
        if not self._auth_leader:
            self._auth_leader = True
            try:
                with trio.CancelScope(shield=True):
                    while self._auth_queue:
                        batch, self._auth_queue = self._auth_queue, []
                        try:
                            await self._authorize_batch(batch)
                        except Exception as exc:
                            log.exception("session check failed")
                            error = StoreUnavailable(f"session check failed: {exc!r}")
                            for r in batch:
                                r.fail(error)
            finally:
                self._auth_leader = False
                # Only a BaseException (KeyboardInterrupt) gets here with work left.
                left, self._auth_queue = self._auth_queue, []
                for r in left:
                    r.fail(StoreUnavailable("session check abandoned"))
        await req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.grant is not None
        return req.grant


class SQLiteStore(BatchedAuth):
    """`Store` on one SQLite file, with a small pool of connections.

    Each connection is used by one worker thread at a time: the limiter has as many
    tokens as the pool has connections, and a connection is taken from the pool (on the
    trio thread) only after a token is held.

    The first connection may create the file and its schema; once the store has been
    open, a missing file is an outage (`StoreUnavailable`), never recreated empty.
    """

    def __init__(self, path: Path, pool_size: int = 4) -> None:
        super().__init__()
        self._path = path
        self._pool_size = pool_size
        self._pool: list[sqlite3.Connection] = []
        self._opened = 0
        self._limiter = trio.CapacityLimiter(pool_size)
        self._inodes: dict[int, int] = {}
        self._created = False
        self._closed = False

    def _check_file(self, conn: sqlite3.Connection) -> None:
        # An open connection keeps reading a database file that was deleted or
        # replaced: that is an outage too, not a store to keep trusting.
        try:
            inode = os.stat(self._path).st_ino
        except OSError as exc:
            raise sqlite3.OperationalError(f"database file: {exc}") from exc
        if self._inodes.get(id(conn)) != inode:
            raise sqlite3.OperationalError("database file was replaced")

    def _connect(self) -> sqlite3.Connection:
        conn = _open(self._path, create=not self._created)
        try:
            self._inodes[id(conn)] = os.stat(self._path).st_ino
        except OSError as exc:
            conn.close()
            raise sqlite3.OperationalError(f"database file: {exc}") from exc
        self._created = True
        return conn

    def mark_created(self) -> None:
        """The file was made by `check_database`: from now on it is never recreated."""
        self._created = True

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._limiter:
            if self._closed:
                raise StoreUnavailable("the session store is closed")
            conn = self._pool.pop() if self._pool else None

            def work() -> tuple[sqlite3.Connection, T]:
                c = conn if conn is not None else self._connect()
                try:
                    self._check_file(c)
                    return c, fn(c)
                except BaseException:
                    if conn is None:
                        self._inodes.pop(id(c), None)
                        c.close()
                    raise

            try:
                used, result = await trio.to_thread.run_sync(work, abandon_on_cancel=False)
            except (sqlite3.Error, OSError) as exc:
                if conn is not None:
                    # A connection that failed may be broken (file gone, disk error):
                    # drop it, the next call opens a fresh one.
                    self._inodes.pop(id(conn), None)
                    conn.close()
                raise StoreUnavailable(str(exc)) from exc
            except BaseException:
                if conn is not None:
                    self._give_back(conn)
                raise
            self._give_back(used)
            return result

    def _give_back(self, conn: sqlite3.Connection) -> None:
        # A call still in its thread when `aclose` gave up waiting closes its own
        # connection on return.
        if self._closed:
            self._inodes.pop(id(conn), None)
            conn.close()
        else:
            self._pool.append(conn)

    async def aclose(self, grace: float = 10.0) -> None:
        """Close every connection, also those still in use in worker threads.

        Holding all the limiter's tokens means no call is in a thread any more; a call
        that is stuck longer than `grace` (a hung disk) closes its own connection
        when it returns. Calls after this raise StoreUnavailable.
        """
        self._closed = True
        held: list[object] = []
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + grace
            for _ in range(self._pool_size):
                borrower = object()
                await self._limiter.acquire_on_behalf_of(borrower)
                held.append(borrower)
        for borrower in held:
            self._limiter.release_on_behalf_of(borrower)
        while self._pool:
            self._pool.pop().close()
        self._inodes.clear()

    async def _authorize_batch(self, batch: list[_AuthRequest]) -> None:
        now = time.time()
        # A burst often asks one question many times (a session's tabs, a reconnect
        # storm): each distinct (session, conversation) is asked once, in the same
        # transaction-free moment as the rest of the batch.
        keys = list(dict.fromkeys((r.token_hash, r.conversation_id) for r in batch))

        def query(c: sqlite3.Connection) -> dict[tuple[str, str | None], _Row]:
            out: dict[tuple[str, str | None], _Row] = {}
            for token_hash, conversation_id in keys:
                row = c.execute(
                    "SELECT s.user_id, c.owner_id FROM sessions s "
                    "LEFT JOIN conversations c ON c.id = ? "
                    "WHERE s.token_hash = ? AND s.revoked = 0 AND s.expires_at > ?",
                    (conversation_id, token_hash, now),
                ).fetchone()
                out[token_hash, conversation_id] = None if row is None else (row[0], row[1])
            return out

        try:
            rows = await self._run(query)
        except StoreUnavailable as exc:
            for r in batch:
                r.fail(exc)
            return
        for r in batch:
            r.grant = _grant(rows[r.token_hash, r.conversation_id], r)
            r.done.set()

    async def ping(self) -> bool:
        try:
            await self._run(lambda c: c.execute("SELECT 1 FROM users LIMIT 1").fetchall())
        except StoreUnavailable:
            return False
        return True

    async def add_user(self, name: str) -> str:
        user_id = str(uuid.uuid4())

        def insert(c: sqlite3.Connection) -> None:
            with c:
                c.execute(
                    "INSERT INTO users (id, name, created_at) VALUES (?, ?, ?)",
                    (user_id, name, time.time()),
                )

        await self._run(insert)
        return user_id

    async def _require_user(self, user_id: str) -> None:
        def find(c: sqlite3.Connection) -> bool:
            return c.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is not None

        if not await self._run(find):
            raise NotFound(f"no such user: {user_id}")

    async def create_session(self, user_id: str, ttl: float = DEFAULT_SESSION_TTL) -> str:
        await self._require_user(user_id)
        token = auth.new_token()
        now = time.time()

        def insert(c: sqlite3.Connection) -> None:
            with c:
                c.execute(
                    "INSERT INTO sessions (token_hash, user_id, expires_at, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (auth.hash_token(token), user_id, now + ttl, now),
                )

        await self._run(insert)
        return token

    async def revoke_session(self, token: str) -> None:
        token_hash = auth.hash_token(token)

        def update(c: sqlite3.Connection) -> int:
            with c:
                cur = c.execute(
                    "UPDATE sessions SET revoked = 1 WHERE token_hash = ?", (token_hash,)
                )
                return cur.rowcount

        if await self._run(update) == 0:
            raise NotFound("no such session")

    async def ended_sessions(self, token_hashes: Collection[str]) -> dict[str, str]:
        hashes = list(token_hashes)
        if not hashes:
            return {}
        now = time.time()

        def query(c: sqlite3.Connection) -> list[tuple[str, int, float]]:
            # One statement for any number of sessions: the hashes travel as one JSON
            # parameter (no limit on bound variables to meet).
            rows = c.execute(
                "SELECT token_hash, revoked, expires_at FROM sessions "
                "WHERE token_hash IN (SELECT value FROM json_each(?))",
                (json.dumps(hashes),),
            ).fetchall()
            return [(str(h), int(r), float(e)) for h, r, e in rows]

        found = {h: (revoked, expires) for h, revoked, expires in await self._run(query)}
        ended: dict[str, str] = {}
        for h in hashes:
            state = found.get(h)
            if state is None or state[0]:
                ended[h] = "revoked"
            elif state[1] <= now:
                ended[h] = "expired"
        return ended

    async def create_conversation(self, owner_id: str, title: str = "") -> str:
        await self._require_user(owner_id)
        conversation_id = str(uuid.uuid4())

        def insert(c: sqlite3.Connection) -> None:
            with c:
                c.execute(
                    "INSERT INTO conversations (id, owner_id, title, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (conversation_id, owner_id, title, time.time()),
                )

        await self._run(insert)
        return conversation_id

    async def seed(
        self,
        users: dict[str, str],
        sessions: dict[str, str],
        conversations: dict[str, str],
    ) -> None:
        """Insert rows with given ids and tokens (benchmarks and demos). Idempotent."""
        rows = SeedRows.of(users, sessions, conversations)

        def insert(c: sqlite3.Connection) -> None:
            with c:
                c.executemany(
                    "INSERT OR IGNORE INTO users (id, name, created_at) VALUES (?, ?, ?)",
                    rows.users,
                )
                c.executemany(
                    "INSERT OR IGNORE INTO sessions (token_hash, user_id, expires_at, "
                    "created_at) VALUES (?, ?, ?, ?)",
                    rows.sessions,
                )
                c.executemany(
                    "INSERT OR IGNORE INTO conversations (id, owner_id, title, created_at) "
                    "VALUES (?, ?, '', ?)",
                    rows.conversations,
                )

        await self._run(insert)


@asynccontextmanager
async def open_store(database_url: str | None) -> AsyncGenerator[Store, None]:
    """Open the store named by `database_url`; its connections close on exit.

    A SQLite file and its schema are created here if missing; a PostgreSQL schema on
    the first connection that succeeds. Once open, a store that cannot be reached
    answers 503 until it can (see errors.StoreUnavailable).

    Raises:
        UsageError: the database can never be opened (see `check_database`).
    """
    from app.pgstore import PostgresStore

    path = await trio.to_thread.run_sync(check_database, database_url)
    store: Store
    if path is None:
        assert database_url is not None
        store = PostgresStore(database_url)
    else:
        sqlite = SQLiteStore(path)
        sqlite.mark_created()
        store = sqlite
    try:
        yield store
    finally:
        await store.aclose()
