"""The periodic full garbage collection (time is a MockClock)."""

from __future__ import annotations

import gc
from typing import Any

import trio
import trio.testing

from app.service import collect_garbage


async def test_full_collections_run_on_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    full: list[float] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(trio.current_time())

    gc.callbacks.append(count)
    try:
        with trio.move_on_after(35):
            await collect_garbage(min_interval=10.0)
    finally:
        gc.callbacks.remove(count)
    assert full == [10.0, 20.0, 30.0]
