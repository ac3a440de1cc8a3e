"""A closed stream leaves no reference cycle behind.

An exception that passes through a frame which still names it makes a cycle, and the
cycle holds everything those frames refer to: the response body, Quart's request,
hypercorn's connection, trio's tasks. Only a full garbage collection frees it; under
churn (10000 streams opened and dropped) such collections stalled the whole process
for up to 1.8 s, long enough for watchers to miss a second of events.
"""

from __future__ import annotations

import gc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tests.conftest import Service, chunk, start_service, watch_path
from tests.natsproc import NatsProcess
from tests.polling import poll_until
from tests.sseclient import Response, request
from tests.streams import has_metric, parse, watch

WATCHERS = 10


def _of_a_stream(obj: object) -> bool:
    """Our frames or exceptions, or a body of ours, found among the garbage."""
    if isinstance(obj, types.FrameType):
        name = obj.f_code.co_filename
        return "/app/" in name or "/quart" in name
    if isinstance(obj, BaseException):
        return True
    return type(obj).__name__ in ("WatchBody", "Watcher", "Outbox")


async def _garbage_of_closing(
    watchers: list[Response], closed: Callable[[], Awaitable[bool]]
) -> list[str]:
    """Close the streams (RST and FIN in turn); the kinds of our objects left in cycles."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i, w in enumerate(watchers):
            if i % 2:
                w.abort()  # RST
            else:
                await w.aclose()  # FIN
        await poll_until(closed)
        gc.collect()
        found = [obj for obj in gc.garbage if _of_a_stream(obj)]
        kinds = sorted({type(obj).__name__ for obj in found})
        del found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return kinds


async def test_closed_streams_leave_no_cyclic_garbage(svc: Service) -> None:
    seeds = await svc.seed(conversations=WATCHERS)
    watchers = [await watch(svc, s.conversation_id, s.token) for s in seeds]
    pub = await svc.publisher()
    for s in seeds:
        await pub.publish(f"chat.chunk.{s.conversation_id}", chunk("token", seq=0))
    with trio.fail_after(10):
        for w in watchers:
            await w.frames_until(count=1)

    async def closed() -> bool:
        # Each stream is over once its subscription is gone (the last watcher left).
        return await svc.nats.chat_subscriptions_async() == []

    assert await _garbage_of_closing(watchers, closed) == []
    await pub.aclose()


async def test_streams_closed_during_admission_leave_no_cyclic_garbage(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Closed while the admission still runs (NATS is down, no `:ok` yet): the
    admission's nursery is cancelled and its exception passes through the body."""
    down = NatsProcess()
    down.start()
    down.kill()  # keep its ports: nothing listens there now
    try:
        svc = await start_service(nursery, down, tmp_path)
        seeds = await svc.seed(conversations=WATCHERS)
        watchers = []
        for s in seeds:
            response = await request(svc.port, watch_path(s.conversation_id), token=s.token)
            assert response.status == 200
            with trio.fail_after(5):
                frame = await response.next_frame()
            assert parse(frame or b"") == ("error", "NATS not available")
            watchers.append(response)

        async def closed() -> bool:
            return await has_metric(svc.port, "chatwatch_watchers 0.0")

        assert await _garbage_of_closing(watchers, closed) == []
        await svc.store.aclose()
    finally:
        down.stop()
