"""A bare ASGI app served by hypercorn's trio worker, and a raw socket client that
parses with h11: for tests of what lies below the app (app/fastsend.py,
app/fastchunk.py), on real sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import h11
import hypercorn.config
import hypercorn.trio
import trio

LIMIT = 15.0  # a hang guard, not a performance limit
FRAME = 70


def frame(i: int) -> bytes:
    """Frame `i`: distinct, fixed size, so a lost, doubled or swapped chunk shows."""
    return f"data: {i:010d} ".encode().ljust(FRAME - 1, b"x") + b"\n"


class StreamApp:
    """``GET /stream/N``: N frames, one body chunk each, then the end of the body.
    ``GET /forever``: frames until the client goes. ``POST /echo``: the body back."""

    def __init__(self) -> None:
        self.ended = trio.Event()
        self.counting = False
        self.task: trio.lowlevel.Task | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/echo":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            headers = [(b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "/forever":
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._until_disconnect, receive, nursery.cancel_scope)
                    i = 0
                    while True:
                        await send(
                            {"type": "http.response.body", "body": frame(i), "more_body": True}
                        )
                        i += 1
            finally:
                self.ended.set()
        count = int(path.rsplit("/", 1)[1])
        self.task = trio.lowlevel.current_task()
        self.counting = True
        for i in range(count):
            await send({"type": "http.response.body", "body": frame(i), "more_body": True})
        self.counting = False
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _until_disconnect(receive: Any, scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()


@asynccontextmanager
async def serving(
    app: Any,
    *,
    sndbuf: int | None = None,
    keep_alive: float | None = None,
    read_timeout: float | None = None,
) -> AsyncGenerator[int, None]:
    """hypercorn serving `app` on 127.0.0.1; yields the port. `sndbuf` is set on the
    listener, which accepted connections inherit; `keep_alive` and `read_timeout`:
    hypercorn's keep_alive_timeout and read_timeout (its defaults when None)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if sndbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    port = int(listener.getsockname()[1])
    config = hypercorn.config.Config()
    config.bind = [f"fd://{listener.detach()}"]
    config.accesslog = None
    config.graceful_timeout = 1
    if keep_alive is not None:
        config.keep_alive_timeout = keep_alive
    if read_timeout is not None:
        config.read_timeout = read_timeout  # type: ignore[assignment]  # annotated int; seconds
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: hypercorn.trio.serve(
                app, config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        try:
            yield port
        finally:
            stop.set()


async def connect(port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    with trio.fail_after(LIMIT):
        await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def request(
    stream: trio.SocketStream,
    conn: h11.Connection,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    read_size: int = 65536,
) -> tuple[int, bytes]:
    """One request on `conn`; the status and the whole body."""
    headers = [("host", "test")]
    if body:
        headers.append(("content-length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=path, headers=headers))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    status = 0
    received = bytearray()
    with trio.fail_after(LIMIT):
        await stream.send_all(out)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(read_size))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(received)
            else:
                raise AssertionError(event)
