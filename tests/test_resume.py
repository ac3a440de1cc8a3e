"""Resume and late join on JetStream: every row of the contract's resume table.

Against real nats-servers: the session's (JetStream on, stream CHAT shared by these
tests; each test has its own conversations) and, where a test needs a stream of its
own or no JetStream at all, a server of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tests.cluster import JsClient
from tests.conftest import Service, chunk, start_service, wait_until_async, watch_path
from tests.natsproc import NatsProcess
from tests.polling import poll_until
from tests.rawnats import RawNats
from tests.sseclient import Response, request
from tests.tcpproxy import TcpProxy

DEADLINE = 10.0
ID_LINE = re.compile(rb"id: ([0-9a-z]+-[0-9]+)\n")


@pytest.fixture
def own_nats() -> Iterator[NatsProcess]:
    """A nats-server of this test's own (JetStream on): its stream is this test's."""
    server = NatsProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def hsvc(nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path) -> AsyncIterator[Service]:
    s = await start_service(nursery, nats, tmp_path, history="on")
    yield s
    await s.store.aclose()


def split(frame: bytes) -> tuple[str | None, str, object]:
    """(id or None, event, data) of one event frame."""
    event_id = None
    match = ID_LINE.match(frame)
    if match is not None:
        event_id = match.group(1).decode()
        frame = frame[match.end() :]
    assert frame.startswith(b"data: "), frame
    assert b"\n" not in frame
    obj = json.loads(frame[6:])
    return event_id, obj["event"], obj["data"]


async def open_watch(
    svc: Service,
    cid: str,
    token: str,
    *,
    last_event_id: str | None = None,
    query: str = "",
) -> Response:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    with trio.fail_after(DEADLINE):
        response = await request(svc.port, watch_path(cid) + query, token=token, headers=headers)
        assert response.status == 200
        assert await response.next_frame() == b":ok"
    return response


async def frames(response: Response, count: int) -> list[bytes]:
    out: list[bytes] = []
    with trio.fail_after(DEADLINE):
        while len(out) < count:
            frame = await response.next_frame()
            assert frame is not None, f"stream ended after {out}"
            if frame.startswith(b":"):
                continue  # keepalive
            out.append(frame)
    return out


async def publish_numbered(pub: RawNats, cid: str, numbers: range) -> None:
    await pub.publish_many([(f"chat.chunk.{cid}", chunk("token", n=n)) for n in numbers])
    await pub.flush()


def numbers(frames_: list[bytes]) -> list[int]:
    out = []
    for f in frames_:
        _id, _event, data = split(f)
        assert isinstance(data, dict)
        out.append(int(data["n"]))
    return out


async def witness(svc: Service, cid: str, token: str) -> Response:
    """A live-only watcher opened before publishing: what it receives is stored (live
    events are the stream's republished copies)."""
    return await open_watch(svc, cid, token, query="?live_only=1")


async def stored(response: Response, count: int) -> list[bytes]:
    """The witness's next `count` events, then it hangs up."""
    try:
        return await frames(response, count)
    finally:
        await response.aclose()


async def test_every_event_frame_has_one_id_and_comments_have_none(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, history="on", keepalive=0.2)
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    response = await open_watch(svc, cid, seed.token)
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{cid}", chunk("token", n=0))
    await pub.publish(f"chat.message.{cid}", b'{"role":"assistant"}')
    await pub.publish(f"chat.chunk.{cid}", b"not json")
    await pub.flush()
    seen: list[bytes] = []
    keepalives = 0
    with trio.fail_after(DEADLINE):
        while len(seen) < 3 or keepalives < 1:
            frame = await response.next_frame()
            assert frame is not None
            if frame.startswith(b":"):
                assert b"id:" not in frame
                keepalives += 1
            else:
                seen.append(frame)
    ids = [split(f)[0] for f in seen]
    assert all(i is not None for i in ids)
    assert len(set(ids)) == 3
    assert [split(f)[1] for f in seen] == ["token", "message", "chunk"]
    # Positions are increasing and share the stream's epoch.
    epochs = {i.split("-")[0] for i in ids if i}
    seqs = [int(i.split("-")[1]) for i in ids if i]
    assert len(epochs) == 1
    assert seqs == sorted(seqs)
    await response.aclose()
    await pub.aclose()
    svc.shutdown.set()


async def test_resume_with_last_event_id_replays_the_gap_then_live(hsvc: Service) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    first = await open_watch(hsvc, cid, seed.token)
    seen = await witness(hsvc, cid, seed.token)
    await publish_numbered(pub, cid, range(10))
    got = await frames(first, 5)
    assert numbers(got) == [0, 1, 2, 3, 4]
    last_id = split(got[-1])[0]
    assert last_id is not None
    first.abort()
    await publish_numbered(pub, cid, range(10, 15))
    await stored(seen, 15)

    again = await open_watch(hsvc, cid, seed.token, last_event_id=last_id)
    replayed = await frames(again, 10)
    assert numbers(replayed) == list(range(5, 15))
    await publish_numbered(pub, cid, range(15, 20))
    live = await frames(again, 5)
    assert numbers(live) == list(range(15, 20))
    # Ids are stable: the same event has the same id on every connection.
    again2 = await open_watch(hsvc, cid, seed.token, last_event_id=last_id)
    assert [split(f)[0] for f in await frames(again2, 10)] == [split(f)[0] for f in replayed]
    for r in (again, again2):
        await r.aclose()
    await pub.aclose()


async def test_resume_by_query_parameter_and_the_header_wins(hsvc: Service) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    seen = await witness(hsvc, cid, seed.token)
    await publish_numbered(pub, cid, range(6))
    got = await stored(seen, 6)
    id1, id3 = split(got[1])[0], split(got[3])[0]
    by_query = await open_watch(hsvc, cid, seed.token, query=f"?last_event_id={id1}")
    assert numbers(await frames(by_query, 4)) == [2, 3, 4, 5]
    both = await open_watch(hsvc, cid, seed.token, last_event_id=id3, query=f"?last_event_id={id1}")
    assert numbers(await frames(both, 2)) == [4, 5]
    await publish_numbered(pub, cid, range(6, 7))
    assert numbers(await frames(both, 1)) == [6]
    for r in (by_query, both):
        await r.aclose()
    await pub.aclose()


async def test_late_join_replays_the_answer_in_progress(hsvc: Service) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    seen = await witness(hsvc, cid, seed.token)
    await pub.publish_many(
        [
            (f"chat.chunk.{cid}", chunk("token", n=0)),
            (f"chat.chunk.{cid}", chunk("done", n=1)),
            (f"chat.message.{cid}", b'{"n": 2}'),
            (f"chat.chunk.{cid}", chunk("thinking", n=3)),
            (f"chat.chunk.{cid}", chunk("token", n=4)),
        ]
    )
    await pub.flush()
    await stored(seen, 5)
    late = await open_watch(hsvc, cid, seed.token)
    assert numbers(await frames(late, 2)) == [3, 4]
    await publish_numbered(pub, cid, range(5, 7))
    assert numbers(await frames(late, 2)) == [5, 6]
    await late.aclose()

    # The last event is a message: a late join replays nothing.
    seen = await witness(hsvc, cid, seed.token)
    await pub.publish(f"chat.message.{cid}", b'{"n": 7}')
    await pub.flush()
    await stored(seen, 1)
    after_message = await open_watch(hsvc, cid, seed.token)
    await publish_numbered(pub, cid, range(8, 9))
    assert numbers(await frames(after_message, 1)) == [8]
    await after_message.aclose()
    await pub.aclose()


async def test_a_conversation_without_a_message_replays_from_its_first_event(
    hsvc: Service,
) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    seen = await witness(hsvc, cid, seed.token)
    await publish_numbered(pub, cid, range(3))
    await stored(seen, 3)
    late = await open_watch(hsvc, cid, seed.token)
    assert numbers(await frames(late, 3)) == [0, 1, 2]
    await late.aclose()
    await pub.aclose()


async def test_live_only_clients_get_no_replay(hsvc: Service) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    seen = await witness(hsvc, cid, seed.token)
    await publish_numbered(pub, cid, range(3))
    await stored(seen, 3)
    live = await open_watch(hsvc, cid, seed.token, query="?live_only=1")
    await publish_numbered(pub, cid, range(3, 4))
    got = await frames(live, 1)
    assert numbers(got) == [3]
    assert split(got[0])[0] is not None  # still resumable later
    await live.aclose()
    await pub.aclose()


@pytest.mark.parametrize(
    ("make_id", "reason"),
    [
        (lambda good: "garbage id", "malformed id"),
        (lambda good: good + "\x00", "malformed id"),
        (lambda good: "zz0zz-" + good.split("-")[1], "it is from another stream"),
        (
            lambda good: good.split("-")[0] + "-99999999999",
            "it is newer than anything stored",
        ),
    ],
)
async def test_an_id_that_cannot_be_resumed_gets_an_error_then_a_late_join(
    hsvc: Service, make_id: object, reason: str
) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    seen = await witness(hsvc, cid, seed.token)
    await pub.publish(f"chat.message.{cid}", b'{"n": 0}')
    await publish_numbered(pub, cid, range(1, 3))
    good = split((await stored(seen, 3))[1])[0]
    assert good is not None
    assert callable(make_id)
    bad = make_id(good)
    header = bad.replace("\x00", "")  # a header cannot carry NUL; the query can
    query = "?last_event_id=" + bad.replace(" ", "%20").replace("\x00", "%00")
    response = await open_watch(hsvc, cid, seed.token, query=query if header != bad else "")
    if header == bad:
        await response.aclose()
        response = await open_watch(hsvc, cid, seed.token, last_event_id=bad)
    got = await frames(response, 3)
    event_id, event, data = split(got[0])
    assert event_id is None
    assert event == "error"
    assert isinstance(data, str)
    assert data.startswith("cannot resume from ")
    assert data.endswith(reason) or reason in data
    assert numbers(got[1:]) == [1, 2]  # then the late join
    await response.aclose()
    await pub.aclose()


async def test_resume_from_a_recreated_stream_is_refused(
    nursery: trio.Nursery, own_nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, own_nats, tmp_path, history="on")
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    pub = await svc.publisher()
    seen = await witness(svc, cid, seed.token)
    await publish_numbered(pub, cid, range(3))
    old = split((await stored(seen, 3))[1])[0]
    assert old is not None
    svc.shutdown.set()
    # The stream is deleted and made again (by the next service), positions restart.
    raw = await RawNats.connect(own_nats.client_port)
    await raw.publish("$JS.API.STREAM.DELETE.CHAT", b"")
    await raw.flush()
    await raw.aclose()
    await wait_until_async(lambda: own_nats.monitor("/jsz")["streams"] == 0)
    (tmp_path / "2").mkdir()
    svc2 = await start_service(nursery, own_nats, tmp_path / "2", history="on")
    seed2 = (await svc2.seed())[0]
    seen = await witness(svc2, seed2.conversation_id, seed2.token)
    await publish_numbered(pub, seed2.conversation_id, range(6, 9))
    await stored(seen, 3)
    response = await open_watch(svc2, seed2.conversation_id, seed2.token, last_event_id=old)
    got = await frames(response, 4)
    assert split(got[0])[1:] == (
        "error",
        f"cannot resume from {old}: it is from another stream (the stream was deleted and"
        " recreated)",
    )
    assert numbers(got[1:]) == [6, 7, 8]
    await response.aclose()
    await pub.aclose()
    svc2.shutdown.set()


async def test_resume_older_than_what_is_kept_is_refused(
    nursery: trio.Nursery, own_nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(
        nursery, own_nats, tmp_path, history="on", history_max_per_conversation=3
    )
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    pub = await svc.publisher()
    first = await witness(svc, cid, seed.token)
    await publish_numbered(pub, cid, range(6))
    got = await frames(first, 6)
    await first.aclose()
    oldest = split(got[0])[0]
    recent = split(got[2])[0]  # events 3..5 are still kept: resumable
    ok = await open_watch(svc, cid, seed.token, last_event_id=recent)
    assert numbers(await frames(ok, 3)) == [3, 4, 5]
    await ok.aclose()
    refused = await open_watch(svc, cid, seed.token, last_event_id=oldest)
    got = await frames(refused, 4)
    assert split(got[0])[1:] == (
        "error",
        f"cannot resume from {oldest}: it is older than the history still kept",
    )
    assert numbers(got[1:]) == [3, 4, 5]
    await refused.aclose()
    await pub.aclose()
    svc.shutdown.set()


async def test_a_replay_over_the_cap_sends_the_newest_after_an_error(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    svc = await start_service(nursery, nats, tmp_path, history="on", replay_cap=3)
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    pub = await svc.publisher()
    first = await witness(svc, cid, seed.token)
    await publish_numbered(pub, cid, range(8))
    got = await frames(first, 8)
    await first.aclose()
    response = await open_watch(svc, cid, seed.token, last_event_id=split(got[0])[0])
    replay = await frames(response, 4)
    assert split(replay[0]) == (
        None,
        "error",
        "replay capped at 3 events: the 4 oldest were left out",
    )
    assert numbers(replay[1:]) == [5, 6, 7]
    await response.aclose()
    await pub.aclose()
    svc.shutdown.set()


async def test_history_off_streams_without_ids_and_refuses_resume(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = NatsProcess(jetstream=False)
    server.start()
    try:
        svc = await start_service(nursery, server, tmp_path, history="auto")
        (seed,) = await svc.seed()
        cid = seed.conversation_id
        response = await open_watch(svc, cid, seed.token, last_event_id="abc-1")
        pub = await svc.publisher()
        await publish_numbered(pub, cid, range(2))
        got = await frames(response, 3)
        assert got[0] == b'data: {"event":"error","data":"history not available"}'
        assert [split(f)[0] for f in got[1:]] == [None, None]
        assert numbers(got[1:]) == [0, 1]
        with trio.fail_after(DEADLINE):
            _status, _headers, body = await _get(svc, "/readyz")
        assert json.loads(body)["history"] is False
        await response.aclose()
        await pub.aclose()
        svc.shutdown.set()
    finally:
        server.stop()


async def _get(svc: Service, path: str) -> tuple[int, dict[str, str], bytes]:
    from tests.sseclient import get

    return await get(svc.port, path)


async def test_readyz_says_history_is_on(hsvc: Service) -> None:
    (seed,) = await hsvc.seed()
    response = await open_watch(hsvc, seed.conversation_id, seed.token)  # history decided
    with trio.fail_after(DEADLINE):
        status, _headers, body = await _get(hsvc, "/readyz")
    assert (status, json.loads(body)) == (200, {"nats": True, "store": True, "history": True})
    await response.aclose()


async def test_reconnect_storm_receives_every_event_once_in_order(hsvc: Service) -> None:
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    pub = await hsvc.publisher()
    total = 2000
    received: list[int] = []

    async def produce() -> None:
        for start in range(0, total, 20):
            await publish_numbered(pub, cid, range(start, start + 20))
            await trio.sleep(0.005)

    with trio.fail_after(60):
        response = await open_watch(hsvc, cid, seed.token, query="?live_only=1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            last_id: str | None = None
            hangups = 0
            while len(received) < total:
                frame = await response.next_frame()
                if frame is None or frame.startswith(b":"):
                    continue
                event_id, _event, data = split(frame)
                assert isinstance(data, dict)
                received.append(int(data["n"]))
                last_id = event_id
                if len(received) % 80 == 0 and len(received) < total:
                    response.abort()
                    hangups += 1
                    assert last_id is not None
                    response = await open_watch(hsvc, cid, seed.token, last_event_id=last_id)
    await response.aclose()
    await pub.aclose()
    assert hangups >= 20
    assert received == list(range(total))


async def test_events_stored_while_the_nats_link_was_down_are_delivered_in_order(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    """The live path misses what is published while chatwatch's NATS connection is
    down (core NATS): the stream has it, and the open stream gets it, in order, on the
    same HTTP connection, before later events."""
    proxy = TcpProxy(nats.client_port)
    await nursery.start(proxy.serve)
    svc = await start_service(
        nursery, nats, tmp_path, history="on", nats_urls=(f"nats://127.0.0.1:{proxy.port}",)
    )
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    response = await open_watch(svc, cid, seed.token, query="?live_only=1")
    pub = await RawNats.connect(nats.client_port)
    await publish_numbered(pub, cid, range(5))
    got = await frames(response, 5)
    assert numbers(got) == list(range(5))

    proxy.cut()
    lost = await frames(response, 1)
    assert split(lost[0])[1:] == ("error", "NATS connection lost")
    before = await stream_last_seq(nats)
    await publish_numbered(pub, cid, range(5, 10))  # stored; chatwatch cannot see them
    await poll_until(lambda: _stored_at_least(nats, before + 5), 10)
    proxy.restore()
    await publish_numbered(pub, cid, range(10, 15))
    rest = await frames(response, 10)
    assert numbers(rest) == list(range(5, 15))
    with trio.fail_after(DEADLINE):
        text = (await _get(svc, "/metrics"))[2].decode()
    assert re.search(r"^chatwatch_gaps_filled_total [1-9]", text, re.M), text
    await response.aclose()
    await pub.aclose()
    svc.shutdown.set()


async def stream_last_seq(nats: NatsProcess) -> int:
    jsz = await nats.monitor_async("/jsz?streams=true")
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            if stream["name"] == "CHAT":
                return int(stream["state"]["last_seq"])
    return 0


async def _stored_at_least(nats: NatsProcess, seq: int) -> bool:
    return await stream_last_seq(nats) >= seq


async def test_a_restart_of_the_nats_server_keeps_streams_and_their_ids(hsvc: Service) -> None:
    """The one nats-server restarts (its JetStream store kept): open streams go on, the
    ids continue in the same stream (same epoch), and every event the producer had
    acknowledged after the restart arrives, in order."""
    (seed,) = await hsvc.seed()
    cid = seed.conversation_id
    w = await open_watch(hsvc, cid, seed.token)
    pub = await RawNats.connect(hsvc.nats.client_port)
    await publish_numbered(pub, cid, range(3))
    before = await frames(w, 3)
    await pub.aclose()
    await trio.to_thread.run_sync(hsvc.nats.kill)
    assert split((await frames(w, 1))[0])[1:] == ("error", "NATS connection lost")
    await trio.to_thread.run_sync(hsvc.nats.start)
    js = await JsClient.open(hsvc.nats.client_port)
    try:

        async def stream_back() -> bool:
            # Asked first, so that no event is published twice: an event's
            # acknowledgement lost to a timeout would be sent again.
            try:
                info = await js.request("$JS.API.STREAM.INFO.CHAT")
            except trio.TooSlowError:
                return False  # JetStream still starting: nobody answers yet
            return "config" in info

        await poll_until(stream_back, limit=30)
        for n in range(3, 6):
            assert "seq" in await js.request(f"chat.chunk.{cid}", chunk("token", n=n))
    finally:
        await js.aclose()
    after = await frames(w, 3)
    assert numbers(after) == [3, 4, 5]
    epochs = {(split(f)[0] or "").split("-")[0] for f in before + after}
    assert len(epochs) == 1  # the same stream: a client could resume across it
    await w.aclose()
