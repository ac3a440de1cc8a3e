"""Opening a watch stream and reading its frames: the steps most tests share."""

from __future__ import annotations

import json
from typing import Protocol

from tests.sseclient import Response, get, request


class HasPort(Protocol):
    @property
    def port(self) -> int: ...


def watch_path(conversation_id: str) -> str:
    return f"/api/ai/conversations/{conversation_id}/watch"


async def watch_port(
    port: int, conversation_id: str, token: str, host: str = "127.0.0.1"
) -> Response:
    """A watch stream that answered 200 and `:ok` (each read under sseclient's
    deadline): from here on nothing published is missed."""
    response = await request(port, watch_path(conversation_id), token=token, host=host)
    assert response.status == 200
    assert await response.next_frame() == b":ok"
    return response


async def watch(svc: HasPort, conversation_id: str, token: str) -> Response:
    """`watch_port` on an in-process service."""
    return await watch_port(svc.port, conversation_id, token)


def parse(frame: bytes) -> tuple[str, object]:
    """An event frame's (event, data); it must be one `data:` line of JSON (after one
    `id:` line when history is on)."""
    if frame.startswith(b"id: "):
        frame = frame.split(b"\n", 1)[1]
    assert frame.startswith(b"data: ")
    assert b"\n" not in frame
    obj = json.loads(frame[6:])
    return obj["event"], obj["data"]


async def metrics(port: int, host: str = "127.0.0.1") -> str:
    """The service's /metrics text."""
    return (await get(port, "/metrics", host=host))[2].decode()


async def has_metric(port: int, line: str, host: str = "127.0.0.1") -> bool:
    """Whether the service's /metrics shows `line` (e.g. "chatwatch_watchers 0.0")."""
    return line in (await metrics(port, host)).splitlines()


async def until_ok(response: Response) -> None:
    """Read up to `:ok`, allowing the one frame a stream gets when it arrives before
    its process's NATS connection is up (a worker that has just started)."""
    frame = await response.next_frame()
    if frame is not None and b"NATS not available" in frame:
        frame = await response.next_frame()
    assert frame == b":ok", frame
