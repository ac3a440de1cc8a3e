"""The watcher's outbox: limits, byte accounting, the write window (MockClock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from app.outbox import Outbox


async def test_offer_respects_both_limits_and_take_gives_the_bytes_back() -> None:
    box = Outbox(max_frames=3, max_bytes=10)
    assert box.offer(b"12345")
    assert not box.offer(b"123456")  # 11 bytes > 10
    assert box.offer(b"1234")
    assert box.queued_bytes == 9
    assert await box.take(1024) == b"123451234"  # what is queued goes as one write
    assert box.queued_bytes == 0
    for _ in range(3):
        assert box.offer(b"x")
    assert not box.offer(b"x")  # 3 frames


async def test_without_a_window_a_lone_frame_is_written_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Outbox(8, 1024)
    box.offer(b"a")
    started = trio.current_time()
    assert await box.take(1024) == b"a"
    assert trio.current_time() == started


async def test_the_write_window_gathers_frames_that_arrive_within_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Outbox(8, 1024, window=0.020)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await box.take(1024))
        got.append(await box.take(1024))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        box.offer(b"a")
        await trio.sleep(0.010)
        box.offer(b"b")  # within the window of "a"
        await trio.sleep(0.015)
        box.offer(b"c")  # after it: the next write
    assert got == [b"ab", b"c"]
    assert box.queued_bytes == 0


async def test_the_window_ends_early_when_the_outbox_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Outbox(8, 1024, window=10.0)
    box.offer(b"last")
    box.close()
    started = trio.current_time()
    assert await box.take(1024) == b"last"
    assert trio.current_time() == started
    with pytest.raises(trio.EndOfChannel):
        await box.take(1024)


async def test_put_waits_for_byte_room_and_a_close_ends_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Outbox(max_frames=100, max_bytes=10)
    await box.put(b"12345678")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.put, b"abcd")  # 12 bytes would pass the budget: waits
        await trio.testing.wait_all_tasks_blocked()
        assert box.queued_bytes == 8
        assert await box.take(1024) == b"12345678"
        await trio.testing.wait_all_tasks_blocked()
        assert box.queued_bytes == 4


async def test_a_put_waiting_for_room_fails_when_the_outbox_closes() -> None:
    box = Outbox(max_frames=100, max_bytes=10)
    await box.put(b"12345678")
    async with trio.open_nursery() as nursery:

        async def close_later() -> None:
            await trio.testing.wait_all_tasks_blocked()
            box.close()

        nursery.start_soon(close_later)
        with pytest.raises(trio.ClosedResourceError):
            await box.put(b"abcd")


async def test_a_parked_take_wakes_for_a_frame_and_for_the_close() -> None:
    box = Outbox(8, 1024)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await box.take(1024))
        with pytest.raises(trio.EndOfChannel):
            await box.take(1024)
        got.append(b"end")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        box.offer(b"a")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b"a"]
        box.close()
    assert got == [b"a", b"end"]


async def test_a_cancelled_take_loses_no_frame() -> None:
    box = Outbox(8, 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.take, 1024)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    box.offer(b"a")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.take(1024)  # cancelled at its checkpoint, before taking
    assert box.queued_bytes == 1
    assert await box.take(1024) == b"a"


async def test_frames_queued_after_the_close_are_refused_but_queued_ones_are_read() -> None:
    box = Outbox(8, 1024)
    box.offer(b"a")
    box.put_last(b"z")
    assert box.offer(b"late")  # closed: nothing to cut off
    assert await box.take(1) == b"a"
    assert box.receive_nowait() == b"z"
    with pytest.raises(trio.EndOfChannel):
        box.receive_nowait()
    with pytest.raises(trio.ClosedResourceError):
        await box.put(b"x")


async def test_put_waits_for_frame_room() -> None:
    box = Outbox(max_frames=2, max_bytes=1024)
    await box.put(b"a")
    await box.put(b"b")
    done: list[bool] = []

    async def third() -> None:
        await box.put(b"c")
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert not done
        assert box.receive_nowait() == b"a"
    assert done
    assert await box.take(1024) == b"bc"


async def test_a_second_concurrent_take_is_refused() -> None:
    box = Outbox(8, 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.take, 1024)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await box.take(1024)
        nursery.cancel_scope.cancel()
