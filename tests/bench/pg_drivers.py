"""Which PostgreSQL driver for the store: psycopg 3 (sync, worker threads) or asyncpg
(on the trio-asyncio loop the bus already runs). docs/findings.md has the figures.

    python -m tests.bench.pg_drivers [--calls 1000] [--runs 3]

Starts a throwaway PostgreSQL (tests/pgproc.py), seeds `--calls` sessions, then times
`--calls` concurrent authorize() calls (a reconnect storm) through each variant,
`--runs` times, and prints the median. Every variant has a pool of 8 connections;
"batched" shares one query per batch (as the store does), "one by one" sends a
query per call. asyncpg is not a dependency: `pip install asyncpg` first.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import trio
import trio_asyncio

from app import auth
from app.pgstore import PostgresStore
from app.store import Access, BatchedAuth, Grant, _AuthRequest, _grant
from tests.pgproc import PostgresProcess

POOL = 8
QUERY_ONE = (
    "SELECT s.user_id, c.owner_id FROM sessions s LEFT JOIN conversations c ON c.id = $1 "
    "WHERE s.token_hash = $2 AND NOT s.revoked AND s.expires_at > $3"
)
QUERY_BATCH = (
    "SELECT r.i, s.user_id, c.owner_id "
    "FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(token_hash, conv, i) "
    "JOIN sessions s ON s.token_hash = r.token_hash AND NOT s.revoked AND s.expires_at > $3 "
    "LEFT JOIN conversations c ON c.id = r.conv"
)


class AsyncpgStore(BatchedAuth):
    """Only what the measurement needs: authorize, batched or one query per call."""

    def __init__(self, pool: Any, *, batched: bool) -> None:
        super().__init__()
        self._pool = pool
        self._batched = batched

    async def _authorize_batch(self, batch: list[_AuthRequest]) -> None:
        rows = await trio_asyncio.aio_as_trio(self._pool.fetch)(
            QUERY_BATCH,
            [r.token_hash for r in batch],
            [r.conversation_id for r in batch],
            time.time(),
        )
        found = {int(row[0]) - 1: (row[1], row[2]) for row in rows}
        for n, r in enumerate(batch):
            r.grant = _grant(found.get(n), r)
            r.done.set()

    async def authorize(self, token: str, conversation_id: str | None) -> Grant:
        if self._batched:
            return await super().authorize(token, conversation_id)
        req = _AuthRequest(auth.hash_token(token), conversation_id)
        row = await trio_asyncio.aio_as_trio(self._pool.fetchrow)(
            QUERY_ONE, conversation_id, req.token_hash, time.time()
        )
        return _grant(None if row is None else (row[0], row[1]), req)


class UnbatchedPsycopg(PostgresStore):
    async def authorize(self, token: str, conversation_id: str | None) -> Grant:
        req = _AuthRequest(auth.hash_token(token), conversation_id)
        now = time.time()
        row = await self._run(
            lambda c: c.execute(
                QUERY_ONE.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"),
                (conversation_id, req.token_hash, now),
            ).fetchone()
        )
        return _grant(None if row is None else (str(row[0]), str(row[1])), req)


async def storm(
    authorize: Callable[[str, str], Awaitable[Grant]], pairs: list[tuple[str, str]]
) -> float:
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for token, cid in pairs:

            async def one(token: str = token, cid: str = cid) -> None:
                grant = await authorize(token, cid)
                assert grant.access is Access.GRANTED

            nursery.start_soon(one)
    return time.perf_counter() - start


async def main(calls: int, runs: int) -> None:
    pg = PostgresProcess()
    await trio.to_thread.run_sync(pg.start)
    try:
        url = await pg.new_database_async()
        setup = PostgresStore(url)
        users = {str(uuid.uuid4()): "u" for _ in range(calls)}
        pairs = [(auth.new_token(), str(uuid.uuid4())) for _ in range(calls)]
        owners = list(users)
        await setup.seed(
            users,
            {t: owners[n] for n, (t, _) in enumerate(pairs)},
            {c: owners[n] for n, (_, c) in enumerate(pairs)},
        )
        await setup.aclose()

        results: dict[str, list[float]] = {}
        async with trio_asyncio.open_loop():
            pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                url, min_size=POOL, max_size=POOL
            )
            try:
                variants: dict[str, Any] = {
                    "psycopg 3, threads, batched": PostgresStore(url, pool_size=POOL),
                    "psycopg 3, threads, one by one": UnbatchedPsycopg(url, pool_size=POOL),
                    "asyncpg, trio-asyncio, batched": AsyncpgStore(pool, batched=True),
                    "asyncpg, trio-asyncio, one by one": AsyncpgStore(pool, batched=False),
                }
                for name, store in variants.items():
                    await storm(store.authorize, pairs[:10])  # warm: connections open
                    results[name] = [await storm(store.authorize, pairs) for _ in range(runs)]
                    if isinstance(store, PostgresStore):
                        await store.aclose()
            finally:
                await trio_asyncio.aio_as_trio(pool.close)()
        print(f"{calls} concurrent authorize() calls, pool {POOL}, median of {runs} runs")
        print("| variant | median ms | runs ms |")
        print("| --- | --- | --- |")
        for name, times in results.items():
            runs_ms = ", ".join(f"{t * 1000:.0f}" for t in times)
            print(f"| {name} | {statistics.median(times) * 1000:.0f} | {runs_ms} |")
    finally:
        await trio.to_thread.run_sync(pg.destroy)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.calls, args.runs)
