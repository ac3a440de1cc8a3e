"""The periodic full garbage collection (time is a MockClock).

The schedule depends on how long each collection really took (wall time, which a
loaded machine stretches), so the tests check the rule, not exact times: the first
collection after `min_interval`, then each gap at least `min_interval` and at least
the previous collection's duration / `budget`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing

from app.service import collect_garbage

MIN_INTERVAL = 10.0
BUDGET = 0.01


class Collections:
    """Wraps `gc.collect`: when each collection started (trio time) and how long it took
    (wall time, measured inside the function's own measurement, so never longer)."""

    def __init__(self, real: Callable[..., int], extra_seconds: float = 0.0) -> None:
        self.real = real
        self.extra_seconds = extra_seconds
        self.began = 0.0
        self.started: list[float] = []
        self.took: list[float] = []

    def __call__(self, *args: int) -> int:
        self.started.append(trio.current_time())
        t0 = time.perf_counter()
        found = self.real(*args)
        if self.extra_seconds and len(self.took) == 0:
            # A slow first collection: a real pause the service must make up for.
            time.sleep(self.extra_seconds)
        self.took.append(time.perf_counter() - t0)
        return found


async def run_for(
    seconds: float, monkeypatch: pytest.MonkeyPatch, extra_seconds: float = 0.0
) -> Collections:
    collections = Collections(gc.collect, extra_seconds)
    monkeypatch.setattr(gc, "collect", collections)
    collections.began = trio.current_time()
    with trio.move_on_after(seconds):
        await collect_garbage(min_interval=MIN_INTERVAL, budget=BUDGET)
    monkeypatch.undo()
    return collections


def assert_rule(c: Collections) -> None:
    assert c.started[0] == pytest.approx(c.began + MIN_INTERVAL)
    for i in range(1, len(c.started)):
        gap = c.started[i] - c.started[i - 1]
        assert gap >= MIN_INTERVAL
        assert gap >= c.took[i - 1] / BUDGET


async def test_full_collections_run_no_more_often_than_the_rule_allows(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for a second collection even if the first took seconds of wall time (each
    # one walks this whole test process's heap: ~0.1 s here).
    c = await run_for(120, monkeypatch)
    assert len(c.started) >= 2
    assert_rule(c)


async def test_a_slow_collection_pushes_the_next_one_back(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mock time is free: long enough for a second collection even if the first
    # took seconds of wall time on a loaded machine.
    c = await run_for(200, monkeypatch, extra_seconds=0.2)
    assert len(c.started) >= 2
    assert c.took[0] >= 0.2
    assert c.started[1] - c.started[0] >= 0.2 / BUDGET  # 20 s, twice MIN_INTERVAL
    assert_rule(c)
