"""The PostgreSQL store: `Store` on a database that several instances share.

psycopg 3's sync API in worker threads, as the SQLite store does, under a
CapacityLimiter with as many tokens as the pool has connections: the pool is bounded,
a slow database never stalls the event loop, and no thread or connection lives outside
the store's own accounting (docs/findings.md has the measurement behind the choice).

A database that is down is an outage, never a reason not to start: connections are
opened on demand with a short connect timeout, a failed one is dropped and the next
call opens a fresh one, so the store recovers by itself when the database returns.
The schema is brought up to date on the first connection that succeeds, through
versioned migrations under a transaction-scoped advisory lock, so instances that start
together migrate one at a time and each sees the others' work.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection
from typing import TypeVar

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict

from app import auth
from app.errors import NotFound, StoreUnavailable
from app.store import DEFAULT_SESSION_TTL, BatchedAuth, SeedRows, _AuthRequest, _grant

log = logging.getLogger("chatwatch.store")

T = TypeVar("T")

SCHEMES = ("postgresql://", "postgres://")

# Any 64-bit constant that other applications sharing the database are unlikely to use.
MIGRATION_LOCK = 0x63686174_77617463  # "chatwatc"

# Append only: a released version is never edited, a change is a new version.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE sessions (
            token_hash TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id),
            expires_at DOUBLE PRECISION NOT NULL,
            revoked BOOLEAN NOT NULL DEFAULT FALSE,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users(id),
            title TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX sessions_user ON sessions(user_id);
        """,
    ),
)

_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}

# Unless the URL says otherwise: an unreachable server must become a 503 in seconds,
# and a peer that vanished without a FIN must be noticed by TCP keepalives.
_DEFAULTS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",  # ms: a query sent into a dead link fails, not hangs
    "application_name": "chatwatch",
}


def is_postgres_url(url: str | None) -> bool:
    return url is not None and url.startswith(SCHEMES)


def check_url(url: str) -> dict[str, str]:
    """The URL's connection parameters, with our defaults; no connection is made.

    Raises:
        ValueError: the URL is malformed (one line, for a usage error).
    """
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed"
        raise ValueError(f"not a valid PostgreSQL URL: {reason}") from None
    for port in params.get("port", "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"not a valid PostgreSQL URL: port {port!r} is not 1-65535")
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ValueError(f"not a valid PostgreSQL URL: sslmode {sslmode!r}")
    for timeout in ("connect_timeout",):
        if timeout in params and not params[timeout].lstrip("-").isdigit():
            raise ValueError(f"not a valid PostgreSQL URL: {timeout} {params[timeout]!r}")
    return {**_DEFAULTS, **params}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the migrations this database lacks; the versions applied.

    One transaction, holding an advisory lock: a second instance starting at the same
    moment waits at the lock, then finds every version recorded and applies nothing.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {int(str(v)) for (v,) in conn.execute("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    if applied:
        log.info("database schema migrated to version %d", applied[-1])
    return applied


Conn = psycopg.Connection[tuple[object, ...]]


class PostgresStore(BatchedAuth):
    """`Store` on PostgreSQL, with a bounded pool of connections opened on demand."""

    def __init__(self, url: str, pool_size: int = 8) -> None:
        super().__init__()
        self._params = check_url(url)
        self._pool_size = pool_size
        self._pool: list[Conn] = []
        self._limiter = trio.CapacityLimiter(pool_size)
        self._migrated = False
        self._closed = False

    def _connect(self) -> Conn:
        conn: Conn = psycopg.connect(autocommit=True, **self._params)  # type: ignore[arg-type]
        try:
            if not self._migrated:
                migrate(conn)
                self._migrated = True
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[Conn], T], *, idempotent: bool = False) -> T:
        """`fn(connection)` in a worker thread, on a pooled or a new connection.

        A pooled connection that has lost its server (a restart, a network cut) means
        every idle one has: they are all dropped, and an `idempotent` call is tried
        once more on a new connection, so no request pays for the stale pool.
        """
        async with self._limiter:
            if self._closed:
                raise StoreUnavailable("the session store is closed")
            conn = self._pool.pop() if self._pool else None
            try:
                return await self._once(conn, fn)
            except psycopg.OperationalError as exc:
                if conn is not None:
                    while self._pool:
                        self._pool.pop().close()
                if conn is None or not idempotent or self._closed:
                    raise StoreUnavailable(_first_line(exc)) from exc
                log.info("database connection lost (%s): retrying on a new one", _first_line(exc))
            except (psycopg.Error, OSError) as exc:
                raise StoreUnavailable(_first_line(exc)) from exc
            try:
                return await self._once(None, fn)
            except (psycopg.Error, OSError) as exc:
                raise StoreUnavailable(_first_line(exc)) from exc

    async def _once(self, conn: Conn | None, fn: Callable[[Conn], T]) -> T:
        def work() -> tuple[Conn, T]:
            c = conn if conn is not None else self._connect()
            try:
                return c, fn(c)
            except BaseException:
                if conn is None:
                    c.close()
                raise

        try:
            used, result = await trio.to_thread.run_sync(work, abandon_on_cancel=False)
        except (psycopg.Error, OSError):
            # Broken or not, a connection that failed is not worth keeping: the next
            # call opens a fresh one (this is how an outage ends).
            if conn is not None:
                conn.close()
            raise
        except BaseException:
            if conn is not None:
                self._give_back(conn)
            raise
        self._give_back(used)
        return result

    def _give_back(self, conn: Conn) -> None:
        if self._closed or conn.closed:
            conn.close()
        else:
            self._pool.append(conn)

    async def aclose(self, grace: float = 10.0) -> None:
        """Close every connection, waiting up to `grace` for those in worker threads.

        A call stuck longer (a hung network) closes its own connection on return.
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

    async def _authorize_batch(self, batch: list[_AuthRequest]) -> None:
        now = time.time()
        hashes = [r.token_hash for r in batch]
        conversations = [r.conversation_id for r in batch]

        def query(c: Conn) -> dict[int, tuple[str, str | None]]:
            # The whole batch in one statement and one round trip.
            rows = c.execute(
                "SELECT r.i, s.user_id, c.owner_id "
                "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS r(token_hash, conv, i) "
                "JOIN sessions s ON s.token_hash = r.token_hash "
                " AND NOT s.revoked AND s.expires_at > %s "
                "LEFT JOIN conversations c ON c.id = r.conv",
                (hashes, conversations, now),
            ).fetchall()
            return {int(str(i)) - 1: (str(u), None if o is None else str(o)) for i, u, o in rows}

        try:
            found = await self._run(query, idempotent=True)
        except StoreUnavailable as exc:
            for r in batch:
                r.fail(exc)
            return
        for n, r in enumerate(batch):
            r.grant = _grant(found.get(n), r)
            r.done.set()

    async def ping(self) -> bool:
        try:
            await self._run(
                lambda c: c.execute("SELECT 1 FROM users LIMIT 1").fetchall(), idempotent=True
            )
        except StoreUnavailable:
            return False
        return True

    async def add_user(self, name: str) -> str:
        user_id = str(uuid.uuid4())
        await self._run(
            lambda c: c.execute(
                "INSERT INTO users (id, name, created_at) VALUES (%s, %s, %s)",
                (user_id, name, time.time()),
            )
        )
        return user_id

    async def _require_user(self, user_id: str) -> None:
        def find(c: Conn) -> bool:
            return c.execute("SELECT 1 FROM users WHERE id = %s", (user_id,)).fetchone() is not None

        if not await self._run(find, idempotent=True):
            raise NotFound(f"no such user: {user_id}")

    async def create_session(self, user_id: str, ttl: float = DEFAULT_SESSION_TTL) -> str:
        await self._require_user(user_id)
        token = auth.new_token()
        now = time.time()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO sessions (token_hash, user_id, expires_at, created_at) "
                "VALUES (%s, %s, %s, %s)",
                (auth.hash_token(token), user_id, now + ttl, now),
            )
        )
        return token

    async def revoke_session(self, token: str) -> None:
        token_hash = auth.hash_token(token)

        def update(c: Conn) -> int:
            cur = c.execute(
                "UPDATE sessions SET revoked = TRUE WHERE token_hash = %s", (token_hash,)
            )
            return cur.rowcount

        if await self._run(update, idempotent=True) == 0:
            raise NotFound("no such session")

    async def ended_sessions(self, token_hashes: Collection[str]) -> dict[str, str]:
        hashes = list(token_hashes)
        if not hashes:
            return {}
        now = time.time()

        def query(c: Conn) -> list[tuple[str, bool, float]]:
            rows = c.execute(
                "SELECT token_hash, revoked, expires_at FROM sessions "
                "WHERE token_hash = ANY(%s::text[])",
                (hashes,),
            ).fetchall()
            return [(str(h), bool(r), float(str(e))) for h, r, e in rows]

        found = {
            h: (revoked, expires) for h, revoked, expires in await self._run(query, idempotent=True)
        }
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
        await self._run(
            lambda c: c.execute(
                "INSERT INTO conversations (id, owner_id, title, created_at) "
                "VALUES (%s, %s, %s, %s)",
                (conversation_id, owner_id, title, time.time()),
            )
        )
        return conversation_id

    async def seed(
        self,
        users: dict[str, str],
        sessions: dict[str, str],
        conversations: dict[str, str],
    ) -> None:
        """Insert rows with given ids and tokens (benchmarks and demos). Idempotent."""
        rows = SeedRows.of(users, sessions, conversations)

        def insert(c: Conn) -> None:
            with c.transaction(), c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO users (id, name, created_at) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    rows.users,
                )
                cur.executemany(
                    "INSERT INTO sessions (token_hash, user_id, expires_at, created_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    rows.sessions,
                )
                cur.executemany(
                    "INSERT INTO conversations (id, owner_id, title, created_at) "
                    "VALUES (%s, %s, '', %s) ON CONFLICT DO NOTHING",
                    rows.conversations,
                )

        await self._run(insert, idempotent=True)  # ON CONFLICT DO NOTHING
