"""SingleFlight: concurrent identical reads share one call (unit tests, MockClock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from app.singleflight import SingleFlight


async def test_concurrent_callers_of_one_key_share_one_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return 42

    results: list[int] = []
    async with trio.open_nursery() as owner:
        flights = SingleFlight(owner)

        async def ask() -> None:
            results.append(await flights.call("k", read))

        async with trio.open_nursery() as callers:
            for _ in range(100):
                callers.start_soon(ask)
        owner.cancel_scope.cancel()
    assert results == [42] * 100
    assert calls == 1


async def test_a_caller_that_leaves_does_not_take_the_answer_from_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def read() -> str:
        await trio.sleep(1)
        return "answer"

    async with trio.open_nursery() as owner:
        flights = SingleFlight(owner)
        with trio.move_on_after(0.5):  # the first caller hangs up mid-call
            await flights.call("k", read)
        assert await flights.call("k", read) == "answer"
        owner.cancel_scope.cancel()


async def test_an_error_reaches_every_waiter_and_the_next_call_tries_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0

    async def read() -> str:
        nonlocal attempts
        attempts += 1
        await trio.sleep(1)
        if attempts == 1:
            raise TimeoutError("no answer")
        return "ok"

    errors: list[BaseException] = []
    async with trio.open_nursery() as owner:
        flights = SingleFlight(owner)

        async def ask() -> None:
            try:
                await flights.call("k", read)
            except TimeoutError as exc:
                errors.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(ask)
        assert len(errors) == 3
        assert await flights.call("k", read) == "ok"
        owner.cancel_scope.cancel()


async def test_distinct_keys_queue_behind_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = peak = 0

    async def read() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1

    async with trio.open_nursery() as owner:
        flights = SingleFlight(owner, limit=4)
        async with trio.open_nursery() as callers:
            for key in range(20):
                callers.start_soon(flights.call, key, read)
        owner.cancel_scope.cancel()
    assert peak == 4


async def test_a_closed_owner_fails_the_waiters() -> None:
    async def read() -> None:
        await trio.sleep_forever()

    flights: list[SingleFlight] = []
    ready = trio.Event()
    owner_scope = trio.CancelScope()

    async def own() -> None:
        with owner_scope:
            async with trio.open_nursery() as owner:
                flights.append(SingleFlight(owner))
                ready.set()
                await trio.sleep_forever()

    async def close_when_waiting() -> None:
        await trio.testing.wait_all_tasks_blocked()
        owner_scope.cancel()

    async with trio.open_nursery() as outer:
        outer.start_soon(own)
        await ready.wait()
        outer.start_soon(close_when_waiting)
        with pytest.raises(trio.ClosedResourceError):
            await flights[0].call("k", read)
