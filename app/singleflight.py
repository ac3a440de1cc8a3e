"""Concurrent identical reads share one call: a reconnect storm costs one fetch.

When a thousand viewers of one conversation come back at once (an instance died, a
deploy), they ask the stream the same questions: where the conversation stands, and the
events after the same id. Each distinct question is asked once; everyone who asks it
while it is in flight gets the same answer (or the same error). The calls run in a
nursery the owner gives (not in the first caller's task: a caller that hangs up must not
take the answer away from the others), at most `limit` at a time, so a storm of
distinct questions queues here instead of flooding NATS with requests that time out.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("done", "ended", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ended = False
        self.value: T | None = None
        self.error: Exception | None = None


class SingleFlight:
    def __init__(self, nursery: trio.Nursery, limit: int = 8) -> None:
        self._nursery = nursery
        self._limiter = trio.CapacityLimiter(limit)
        self._flights: dict[Hashable, _Flight[Any]] = {}
        self.calls = 0
        self.shared = 0

    async def call(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()`'s result, shared with every concurrent caller of the same `key`."""
        flight: _Flight[T] | None = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            # Started before it is registered: a closed nursery raises here, and
            # leaves no key behind for later callers to wait on forever.
            self._nursery.start_soon(self._run, key, flight, fn)
            self._flights[key] = flight
            self.calls += 1
        else:
            self.shared += 1
        await flight.done.wait()
        if flight.error is not None:
            # A copy per waiter: one exception object raised in many tasks would gather
            # all their tracebacks (and the reference cycles that come with them).
            raise copy.copy(flight.error) from flight.error
        return flight.value  # type: ignore[return-value]  # set when error is None

    async def _run(self, key: Hashable, flight: _Flight[T], fn: Callable[[], Awaitable[T]]) -> None:
        try:
            async with self._limiter:
                try:
                    flight.value = await fn()
                except Exception as exc:  # given to every waiter; Cancelled is not caught
                    flight.error = exc
                flight.ended = True
        finally:
            if not flight.ended:  # cancelled (shutdown): the waiters are told so
                flight.error = trio.ClosedResourceError("the hub is closed")
            self._flights.pop(key, None)
            flight.done.set()
