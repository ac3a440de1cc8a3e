"""The one place the tests poll.

Polling is for state outside the test's process (nats-server's monitor, a service
subprocess's /metrics, its log, /proc), which offers nothing to await. Everything
inside the process is awaited instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

POLL_INTERVAL = 0.02
# A hang guard, not a performance limit: two cores shared by parallel runs can stall
# a process for seconds. A test that means a limit passes its own.
LIMIT = 15.0


async def poll_until(check: Callable[[], Awaitable[object]], limit: float = LIMIT) -> None:
    """Await `check()` until it is truthy; fail with TooSlowError after `limit` s."""
    with trio.fail_after(limit):
        while not await check():  # ruff: ignore[async-busy-wait] - external state
            await trio.sleep(POLL_INTERVAL)


async def wait_until(predicate: Callable[[], object], limit: float = LIMIT) -> None:
    """`poll_until` for a synchronous predicate, run in a worker thread.

    Such predicates block (an HTTP call to the NATS monitor, a read of /proc or of a
    log): on the trio thread they would freeze the in-process service under test for
    as long, and a "within 1 s" test would measure the test, not the service. The
    predicate must not touch trio objects; for those, await instead of polling.
    """

    async def check() -> object:
        # abandon_on_cancel: at the deadline, fail at once even if the call hangs (the
        # monitor's own timeout ends that thread soon after).
        return await trio.to_thread.run_sync(predicate, abandon_on_cancel=True)

    await poll_until(check, limit)


# The old name for the same thing, kept so that tests written against it still run.
wait_until_async = wait_until


async def holds_within(check: Callable[[], object], limit: float) -> bool:
    """Whether a cheap in-process condition (the lists many client tasks fill) holds
    within `limit` seconds; False instead of an error, for scripts that report it."""

    async def holds() -> object:
        return check()

    try:
        await poll_until(holds, limit)
    except trio.TooSlowError:
        return False
    return True
