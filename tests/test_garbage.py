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

import trio

from tests.conftest import Service, chunk, wait_until
from tests.streams import watch

WATCHERS = 10


def _of_a_stream(obj: object) -> bool:
    """Our frames or exceptions, or a body of ours, found among the garbage."""
    if isinstance(obj, types.FrameType):
        name = obj.f_code.co_filename
        return "/app/" in name or "/quart" in name
    if isinstance(obj, BaseException):
        return True
    return type(obj).__name__ in ("WatchBody", "Watcher", "Outbox")


async def test_closed_streams_leave_no_cyclic_garbage(svc: Service) -> None:
    seeds = await svc.seed(conversations=WATCHERS)
    watchers = [await watch(svc, s.conversation_id, s.token) for s in seeds]
    pub = await svc.publisher()
    for s in seeds:
        await pub.publish(f"chat.chunk.{s.conversation_id}", chunk("token", seq=0))
    with trio.fail_after(10):
        for w in watchers:
            await w.frames_until(count=1)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i, w in enumerate(watchers):
            if i % 2:
                w.abort()  # RST
            else:
                await w.aclose()  # FIN
        # Each stream is over once its subscription is gone (the last watcher left).
        await wait_until(lambda: svc.nats.chat_subscriptions() == [])
        gc.collect()
        found = [obj for obj in gc.garbage if _of_a_stream(obj)]
        kinds = sorted({type(obj).__name__ for obj in found})
        del found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert kinds == []
    await pub.aclose()
