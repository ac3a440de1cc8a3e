"""The one place the tests poll.

Polling is for state outside the test's process (nats-server's monitor, a service
subprocess's /metrics, its log, /proc), which offers nothing to await. Everything
inside the process is awaited instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

POLL_INTERVAL = 0.02


async def poll_until(check: Callable[[], Awaitable[object]], limit: float = 5.0) -> None:
    """Await `check()` until it is truthy; fail with TooSlowError after `limit` s."""
    with trio.fail_after(limit):
        while not await check():  # ruff: ignore[async-busy-wait] - external state
            await trio.sleep(POLL_INTERVAL)


async def wait_until(predicate: Callable[[], object], limit: float = 5.0) -> None:
    """`poll_until` for a cheap synchronous predicate."""

    async def check() -> object:
        return predicate()

    await poll_until(check, limit)


async def wait_until_async(predicate: Callable[[], object], limit: float = 5.0) -> None:
    """`poll_until` for a blocking predicate (an HTTP call to the NATS monitor), run in
    a worker thread."""

    async def check() -> object:
        return await trio.to_thread.run_sync(predicate)

    await poll_until(check, limit)
