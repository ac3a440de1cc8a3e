"""The asyncio peer: the same gateway written the way an asyncio service usually is.

    python tests/bench/peers/asyncio_peer.py PORT NATS_URL AUTH_FILE

Starlette + sse-starlette on uvicorn (uvloop, httptools), nats-py, one NATS
subscription (`chat.*.{id}`) per watcher read by a callback into that watcher's
queue, `await nc.flush()` before `:ok`. Sessions and ownership come from the
benchmark's auth file (token -> user and conversations). It exists to give
chatwatch's numbers a reference, not to be a second product: it honours the wire
format and the status codes the load generator checks, nothing else.

`ASYNCIO_PEER_SHIELD_FLUSH=1` wraps the flush in `asyncio.shield`, the workaround for
the nats-py cancelled-flush bug (docs/findings.md); by default the peer has the bug,
as a straightforward implementation does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
QUEUE_FRAMES = 8192
SHIELD_FLUSH = os.environ.get("ASYNCIO_PEER_SHIELD_FLUSH") == "1"


def frame(subject: str, payload: bytes) -> bytes:
    kind = subject.split(".")[1]
    text = payload.decode("utf-8", "replace")
    try:
        data: Any = json.loads(text)
        raw = text.replace("\r", " ").replace("\n", " ")
    except ValueError:
        data, raw = None, json.dumps(text)
    if kind == "message":
        event = "message"
    elif isinstance(data, dict) and isinstance(data.get("chunk_type"), str):
        event = data["chunk_type"]
    else:
        event = "chunk"
    return b'data: {"event":' + json.dumps(event).encode() + b',"data":' + raw.encode() + b"}\n\n"


def make_app(nats_url: str, auth: dict[str, Any]) -> Starlette:
    state: dict[str, Any] = {}

    def token_of(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return str(header[7:].strip())
        cookie = request.cookies.get("chatwatch_session")
        return None if cookie is None else str(cookie)

    async def watch(request: Request) -> Response:
        entry = auth.get(token_of(request) or "")
        if not isinstance(entry, dict):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        cid = request.path_params["cid"]
        owned = {str(c).lower() for c in entry.get("conversations") or ()}
        if not UUID_RE.match(cid) or cid.lower() not in owned:
            return JSONResponse({"error": "not_found"}, status_code=404)
        nc = state["nc"]
        queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_FRAMES)

        overflowed = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            try:
                queue.put_nowait(frame(msg.subject, msg.data))
            except asyncio.QueueFull:
                overflowed.set()

        async def body() -> AsyncIterator[bytes]:
            sub = await nc.subscribe(f"chat.*.{cid.lower()}", cb=on_msg)
            try:
                if SHIELD_FLUSH:
                    await asyncio.shield(nc.flush())
                else:
                    await nc.flush()
                yield b":ok\n\n"
                while not overflowed.is_set():
                    yield await queue.get()
            finally:
                await sub.unsubscribe()

        return EventSourceResponse(
            body(),
            ping=15,
            sep="\n",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None, None]:
        state["nc"] = await nats.connect(nats_url, max_reconnect_attempts=-1)
        try:
            yield
        finally:
            await state["nc"].close()

    return Starlette(
        routes=[Route("/api/ai/conversations/{cid}/watch", watch)],
        lifespan=lifespan,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[0].isdigit():
        print("usage: asyncio_peer.py PORT NATS_URL AUTH_FILE", file=sys.stderr)
        return 2
    port, nats_url, auth_file = argv
    auth = json.loads(Path(auth_file).read_text())
    uvicorn.run(
        make_app(nats_url, auth),
        host="127.0.0.1",
        port=int(port),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
