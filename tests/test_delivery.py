"""Delivery guarantees, end to end through a real nats-server."""

from __future__ import annotations

import json

import trio

from tests.conftest import Service, chunk, wait_until
from tests.streams import parse, watch

# `parse` and `watch` lived here once; tests elsewhere may still import them from here.
__all__ = ["parse", "watch"]


async def test_interleaved_chunks_and_messages_arrive_in_publish_order(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    response = await watch(svc, cid, seed.token)
    pub = await svc.publisher()
    items = []
    for i in range(2000):
        if i % 3 == 2:
            items.append((f"chat.message.{cid}", json.dumps({"seq": i}).encode()))
        else:
            items.append((f"chat.chunk.{cid}", chunk("token", seq=i)))
    await pub.publish_many(items)
    with trio.fail_after(20):
        got: list[int] = []
        while len(got) < 2000:
            frame = await response.next_frame()
            assert frame is not None
            if frame.startswith(b":"):
                continue
            event, data = parse(frame)
            assert isinstance(data, dict)
            assert event == ("message" if data["seq"] % 3 == 2 else "token")
            got.append(data["seq"])
    assert got == list(range(2000))
    await response.aclose()
    await pub.aclose()


async def test_publish_right_after_ok_is_never_missed(svc: Service) -> None:
    seeds = await svc.seed(conversations=100)
    pub = await svc.publisher()
    for round_no, seed in enumerate(seeds):
        # A new conversation each round: every round makes and confirms a new
        # subscription, which is where an early publish could be lost.
        response = await watch(svc, seed.conversation_id, seed.token)
        await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("token", round=round_no))
        with trio.fail_after(5):
            frame = await response.next_frame()
        assert frame is not None
        assert parse(frame) == ("token", {"chunk_type": "token", "round": round_no})
        response.abort()
    await pub.aclose()


async def test_many_watchers_share_one_subscription_and_all_receive(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    watchers = [await watch(svc, cid, seed.token) for _ in range(25)]
    assert await svc.nats.chat_subscriptions_async() == [f"chat.*.{cid}"]
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{cid}", chunk("thinking", text="hmm"))
    for w in watchers:
        with trio.fail_after(5):
            frame = await w.next_frame()
        assert frame is not None
        assert parse(frame)[0] == "thinking"
        w.abort()
    await wait_until(lambda: svc.nats.chat_subscriptions() == [])
    await pub.aclose()


async def test_conversations_do_not_see_each_other(svc: Service) -> None:
    a, b = await svc.seed(conversations=2)
    wa = await watch(svc, a.conversation_id, a.token)
    wb = await watch(svc, b.conversation_id, b.token)
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{a.conversation_id}", chunk("token", to="a"))
    await pub.publish(f"chat.chunk.{b.conversation_id}", chunk("token", to="b"))
    await pub.publish(f"chat.message.{a.conversation_id}", b'{"to":"a"}')
    with trio.fail_after(5):
        fa = [parse(f) for f in await wa.frames_until(count=2)]
        fb = [parse(f) for f in await wb.frames_until(count=1)]
    assert fa == [("token", {"chunk_type": "token", "to": "a"}), ("message", {"to": "a"})]
    assert fb == [("token", {"chunk_type": "token", "to": "b"})]
    # And b got nothing more: a marker published to b arrives next, not a's message.
    await pub.publish(f"chat.chunk.{b.conversation_id}", chunk("done"))
    with trio.fail_after(5):
        assert parse(await wb.next_frame() or b"")[0] == "done"
    wa.abort()
    wb.abort()
    await pub.aclose()


async def test_events_before_ok_are_not_replayed_and_after_are_not_duplicated(
    svc: Service,
) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{cid}", chunk("token", seq=-1))
    await pub.flush()
    first = await watch(svc, cid, seed.token)
    second = await watch(svc, cid, seed.token)
    for i in range(50):
        await pub.publish(f"chat.chunk.{cid}", chunk("token", seq=i))
    for w in (first, second):
        with trio.fail_after(5):
            seqs = [parse(f)[1]["seq"] for f in await w.frames_until(count=50)]  # type: ignore[index]
        assert seqs == list(range(50))
        w.abort()
    await pub.aclose()
