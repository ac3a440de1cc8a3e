"""A resuming SSE watcher for deployment tests: it records every numbered event and the
id of the last one, so that after its stream ends it can go on elsewhere with
`Last-Event-ID`, the way EventSource does.

Producers in these tests publish `chunk("token", n=k)` payloads, numbered per
conversation from 0; what a watcher received is then just a list of numbers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tests.sseclient import Response, request
from tests.streams import watch_path

ID_LINE = re.compile(rb"id: ([0-9a-z]+-[0-9]+)\n")
# The shared hang guard (sseclient's per-read limit applies inside it as well).
OPEN_LIMIT = 15.0


def parse_event(frame: bytes) -> tuple[str | None, str, object] | None:
    """(id or None, event, data) of an event frame; None for a comment or a lone
    ``retry:`` field (control blocks carry no event)."""
    if frame.startswith((b":", b"retry:")):
        return None
    event_id = None
    match = ID_LINE.match(frame)
    if match is not None:
        event_id = match.group(1).decode()
        frame = frame[match.end() :]
    assert frame.startswith(b"data: "), frame
    assert b"\n" not in frame, frame
    obj = json.loads(frame[6:])
    return event_id, obj["event"], obj["data"]


@dataclass
class Watcher:
    """One viewer of one conversation, across however many connections."""

    conversation_id: str
    token: str
    numbers: list[int] = field(default_factory=list)
    last_id: str | None = None
    connections: int = 0
    errors: list[str] = field(default_factory=list)

    async def open(self, port: int) -> Response:
        """Connect (resuming from the last id seen, if any) and read up to ``:ok``."""
        headers = {} if self.last_id is None else {"Last-Event-ID": self.last_id}
        response = await request(
            port, watch_path(self.conversation_id), token=self.token, headers=headers
        )
        try:
            assert response.status == 200, response.status
            first = await response.next_frame()
            assert first == b":ok", first
        except BaseException:
            response.abort()
            raise
        self.connections += 1
        return response

    async def read(self, response: Response, until: int | None = None) -> bool:
        """Record events until the stream ends (False) or event number `until` has
        arrived (True). Every read has the response's deadline."""
        while True:
            frame = await response.next_frame()
            if frame is None:
                return False
            parsed = parse_event(frame)
            if parsed is None:
                continue
            event_id, event, data = parsed
            if event == "error":
                # A refused resume: kept so the test can say so, not silently skipped.
                self.errors.append(str(data))
                continue
            assert isinstance(data, dict), frame
            assert event_id is not None, f"an event without an id: {frame!r}"
            self.numbers.append(int(data["n"]))
            self.last_id = event_id
            if until is not None and self.numbers[-1] >= until:
                return True
