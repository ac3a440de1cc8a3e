"""The wire format: one frame per event, one line per frame, valid JSON whatever the
payload. Unit tests of the pure framing, then the same cases end to end."""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given, settings, strategies as st

from app import sse
from app.events import parse_event
from tests.conftest import Service
from tests.streams import watch

MAX = 1024 * 1024

# (subject kind, payload, expected event, expected data)
CASES: list[tuple[str, bytes, str, object]] = [
    (
        "chunk",
        b'{"chunk_type":"token","text":"hi"}',
        "token",
        {"chunk_type": "token", "text": "hi"},
    ),
    ("chunk", b'{"text":"no type"}', "chunk", {"text": "no type"}),
    ("chunk", b"plain text, not json", "chunk", "plain text, not json"),
    ("chunk", b"[1, 2, 3]", "chunk", [1, 2, 3]),
    ("chunk", b'"just a string"', "chunk", "just a string"),
    ("chunk", b'{"chunk_type": 7}', "chunk", {"chunk_type": 7}),
    ("chunk", b'{"chunk_type": null}', "chunk", {"chunk_type": None}),
    (
        "chunk",
        b'{\n  "chunk_type": "thinking",\r\n  "text": "a"\n}',
        "thinking",
        {"chunk_type": "thinking", "text": "a"},
    ),
    (
        "chunk",
        b'oops\n\ndata: {"event":"forged","data":1}\n\n',
        "chunk",
        'oops\n\ndata: {"event":"forged","data":1}\n\n',
    ),
    (
        "chunk",
        b'{"chunk_type":"to\\nken\\"x","t":1}',
        'to\nken"x',
        {"chunk_type": 'to\nken"x', "t": 1},
    ),
    ("chunk", b'{"chunk_type":"a\\r\\ndata: x"}', "a\r\ndata: x", {"chunk_type": "a\r\ndata: x"}),
    ("chunk", b"\xff\xfe not utf-8 \xc3", "chunk", "\ufffd\ufffd not utf-8 \ufffd"),
    ("chunk", b"NaN", "chunk", "NaN"),
    ("chunk", b'{"x": Infinity}', "chunk", '{"x": Infinity}'),
    ("chunk", b"", "chunk", ""),
    ("chunk", b'{"text":"line\\u2028sep"}', "chunk", {"text": "line\u2028sep"}),
    ("chunk", '{"text":"caf\u00e9 \u2603"}'.encode(), "chunk", {"text": "caf\u00e9 \u2603"}),
    (
        "message",
        b'{"chunk_type":"token","role":"assistant"}',
        "message",
        {"chunk_type": "token", "role": "assistant"},
    ),
    ("message", b"not json\r\n", "message", "not json\r\n"),
]


def decode_frame(frame: bytes) -> tuple[str, object]:
    """Parse a frame the way the SSE spec does, then JSON.parse the data."""
    assert frame.endswith(b"\n\n")
    body = frame[:-2]
    assert b"\r" not in body
    lines = body.split(b"\n")
    data_lines = [line for line in lines if line.startswith(b"data:")]
    assert len(data_lines) == 1, frame
    obj = json.loads(data_lines[0][5:].removeprefix(b" "))
    assert set(obj) == {"event", "data"}
    return obj["event"], obj["data"]


@pytest.mark.parametrize(("kind", "payload", "event", "data"), CASES)
def test_frame_for_payload(kind: str, payload: bytes, event: str, data: object) -> None:
    ev = parse_event(kind, payload, MAX)
    assert ev is not None
    assert decode_frame(ev.frame) == (event, data)


def test_valid_json_payload_is_embedded_as_written() -> None:
    ev = parse_event("chunk", b'{"chunk_type":"token","n":1.50}', MAX)
    assert ev is not None
    assert ev.frame == b'data: {"event":"token","data":{"chunk_type":"token","n":1.50}}\n\n'


def test_large_payload_is_one_frame() -> None:
    text = "x" * (512 * 1024)
    ev = parse_event("chunk", json.dumps({"chunk_type": "token", "text": text}).encode(), MAX)
    assert ev is not None
    assert decode_frame(ev.frame) == ("token", {"chunk_type": "token", "text": text})


def test_payload_over_the_limit_becomes_an_error_event_naming_its_size() -> None:
    ev = parse_event("chunk", b"y" * 101, 100)
    assert ev is not None
    event, data = decode_frame(ev.frame)
    assert event == "error"
    assert isinstance(data, str)
    assert "101 bytes" in data


def test_absurdly_deep_json_is_delivered_as_text() -> None:
    payload = b"[" * 200_000
    ev = parse_event("chunk", payload, MAX)
    assert ev is not None
    assert decode_frame(ev.frame) == ("chunk", payload.decode())


def test_unknown_kind_is_none() -> None:
    assert parse_event("other", b"{}", MAX) is None


def test_comment_and_error_frames_cannot_break_lines() -> None:
    assert sse.comment("a\r\nb\nc") == b": a  b c\n\n"
    event, data = decode_frame(sse.error_frame("bad\n\ndata: x"))
    assert (event, data) == ("error", "bad\n\ndata: x")
    assert sse.retry_frame(1000) == b"retry: 1000\n\n"


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["chunk", "message"]), payload=st.binary(max_size=2048))
def test_any_bytes_make_exactly_one_parseable_frame(kind: str, payload: bytes) -> None:
    ev = parse_event(kind, payload, MAX)
    assert ev is not None
    event, data = decode_frame(ev.frame)
    assert ev.frame.count(b"\n\n") == 1
    assert ev.frame.count(b"\n") == 2
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        assert data == payload.decode("utf-8", "replace")
        return
    try:
        value = json.loads(text)
        is_json = "NaN" not in text and "Infinity" not in text
    except ValueError:
        is_json = False
    if is_json:
        assert data == value
    else:
        assert data == text
    if kind == "message":
        assert event == "message"


@settings(max_examples=200, deadline=None)
@given(chunk_type=st.text(max_size=50), text=st.text(max_size=200))
def test_any_chunk_type_round_trips(chunk_type: str, text: str) -> None:
    payload = json.dumps({"chunk_type": chunk_type, "text": text}).encode()
    ev = parse_event("chunk", payload, MAX)
    assert ev is not None
    assert decode_frame(ev.frame) == (chunk_type, {"chunk_type": chunk_type, "text": text})


async def test_hostile_payloads_end_to_end(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    w = await watch(svc, cid, seed.token)
    pub = await svc.publisher()
    big = json.dumps({"chunk_type": "token", "text": "z" * (512 * 1024)}).encode()
    cases = [*CASES, ("chunk", big, "token", json.loads(big))]
    for kind, payload, _, _ in cases:
        await pub.publish(f"chat.{kind}.{cid}", payload)
    with trio.fail_after(10):
        for _kind, _payload, event, data in cases:
            frame = await w.next_frame()
            assert frame is not None
            assert decode_frame(frame + b"\n\n") == (event, data)
    w.abort()
    await pub.aclose()
