"""SSE framing, pure and I/O-free: every frame chatwatch writes is built here.

A frame is always exactly one ``data:`` line. Everything that comes from outside
(event names, payloads, error texts) reaches the wire as JSON with no raw CR or LF, so
nothing published on NATS can end a line, split a frame or forge another event.
"""

import json

OK = b":ok\n\n"
KEEPALIVE = b": keepalive\n\n"

_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def json_string(text: str) -> bytes:
    """A JSON string literal; ``ensure_ascii`` escapes every line terminator."""
    return _dumps(text).encode("ascii")


def data_frame(event_json: bytes, data_json: bytes, event_id: str | None = None) -> bytes:
    """``data: {"event":<event_json>,"data":<data_json>}`` as one frame.

    Both arguments must already be one-line JSON (see `events.py`). `event_id`, when
    given, is an ``{epoch}-{seq}`` id (lowercase letters, digits, one hyphen: nothing
    that could end a line): it becomes an ``id:`` line before the data.
    """
    head = b"" if event_id is None else b"id: " + event_id.encode("ascii") + b"\n"
    return head + b'data: {"event":' + event_json + b',"data":' + data_json + b"}\n\n"


def error_frame(text: str, event_id: str | None = None) -> bytes:
    """The contract's ``error`` event: a problem the client should show.

    Only an error that stands for a stored event (one too large to forward) has an id;
    errors about the stream itself never do (a client resumes from event ids only).
    """
    return data_frame(b'"error"', json_string(text), event_id)


def comment(text: str) -> bytes:
    """A comment line; clients ignore it. CR/LF in `text` are replaced, never written."""
    safe = text.replace("\r", " ").replace("\n", " ")
    return b": " + safe.encode("utf-8", "replace") + b"\n\n"


def retry_frame(milliseconds: int) -> bytes:
    """A ``retry:`` field alone: tells EventSource how long to wait before reconnecting."""
    return b"retry: " + str(int(milliseconds)).encode("ascii") + b"\n\n"
