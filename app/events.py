"""Turn one NATS message into one SSE frame: parsed and encoded once per event.

The frame is built here, once, and the same bytes object goes to every watcher of the
conversation (see `hub.py`); nothing downstream looks inside it again.
"""

import json
from dataclasses import dataclass
from typing import Final

from app import sse

CHUNK: Final = "chunk"
MESSAGE: Final = "message"

_MESSAGE_EVENT = sse.json_string(MESSAGE)
_CHUNK_EVENT = sse.json_string(CHUNK)


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON: a browser's JSON.parse would fail on them.
    raise ValueError(name)


_strict_decoder = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass(frozen=True, slots=True)
class ChatEvent:
    """One event for the watchers of one conversation.

    `frame` is the complete SSE frame. `event_id` is its resumable position when
    history is on (see history.py); core NATS events have none.
    """

    kind: str
    frame: bytes
    event_id: str | None = None


def _payload_json(payload: bytes) -> tuple[object, bytes]:
    """Return (parsed value or None, one-line JSON for the payload).

    Valid JSON is embedded as written (one line: CR/LF in valid JSON can only be
    whitespace, so they become spaces). Anything else becomes a JSON string of its
    text, invalid UTF-8 replaced.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None, sse.json_string(payload.decode("utf-8", "replace"))
    try:
        value = _strict_decoder.decode(text)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack (`[[[[...`); still a
        # payload to deliver, as text.
        return None, sse.json_string(text)
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
        return value, text.encode("utf-8")
    # Valid UTF-8 decodes and encodes back to the same bytes: no copy to make.
    return value, bytes(payload)


def parse_event(
    kind: str, payload: bytes, max_payload: int, event_id: str | None = None
) -> ChatEvent | None:
    """Build the frame for a message on ``chat.{kind}.{id}``; None for unknown kinds.

    `event_id` (history on) becomes the frame's ``id:`` line.
    """
    if kind != CHUNK and kind != MESSAGE:
        return None
    if len(payload) > max_payload:
        text = f"event of {len(payload)} bytes dropped: larger than the {max_payload} byte limit"
        return ChatEvent(kind, sse.error_frame(text, event_id), event_id)
    value, data = _payload_json(payload)
    if kind == MESSAGE:
        event = _MESSAGE_EVENT
    else:
        chunk_type = value.get("chunk_type") if isinstance(value, dict) else None
        event = sse.json_string(chunk_type) if isinstance(chunk_type, str) else _CHUNK_EVENT
    return ChatEvent(kind, sse.data_frame(event, data, event_id), event_id)
