"""A small HTTP/1.1 SSE client on raw trio sockets: exact bytes, abrupt closes.

Every read has a deadline (`READ_LIMIT` unless the caller gives another), so a
service that stops answering fails the test with `trio.TooSlowError` instead of
hanging the run. A test waiting for something slow on purpose passes `limit=`.
"""

from __future__ import annotations

import socket
import struct

import trio

# Generous: an event the service already has arrives in milliseconds, but two cores
# shared by parallel runs can stall a process for seconds.
READ_LIMIT = 15.0


class Response:
    def __init__(self, stream: trio.SocketStream, limit: float = READ_LIMIT) -> None:
        self.stream = stream
        self.limit = limit
        self.status = 0
        self.headers: dict[str, str] = {}
        self._raw = b""
        self._chunked = False
        self._body = b""
        self._eof = False
        self.raw_body = b""

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            self._eof = True
            return False
        self._raw += data
        return True

    async def read_head(self) -> None:
        with trio.fail_after(self.limit):
            await self._read_head()

    async def _read_head(self) -> None:
        while b"\r\n\r\n" not in self._raw:
            if not await self._fill():
                raise EOFError("connection closed before the response head")
        head, _, self._raw = self._raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"

    def _decode(self) -> None:
        if not self._chunked:
            self._body += self._raw
            self.raw_body += self._raw
            self._raw = b""
            return
        while True:
            size_line, sep, rest = self._raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                self._eof = True
                self._raw = b""
                return
            if len(rest) < size + 2:
                return
            self._body += rest[:size]
            self.raw_body += rest[:size]
            self._raw = rest[size + 2 :]

    async def next_frame(self, limit: float | None = None) -> bytes | None:
        """The next SSE block (without its blank line), or None at the end; TooSlowError
        after `limit` (default: this response's)."""
        with trio.fail_after(self.limit if limit is None else limit):
            return await self._next_frame()

    async def _next_frame(self) -> bytes | None:
        while True:
            self._decode()
            if b"\n\n" in self._body:
                frame, _, self._body = self._body.partition(b"\n\n")
                return frame
            if self._eof or not await self._fill():
                self._decode()
                if b"\n\n" in self._body:
                    continue
                return None

    async def read_body(self, limit: float | None = None) -> bytes:
        """The rest of the body, up to the end of the response."""
        with trio.fail_after(self.limit if limit is None else limit):
            while not self._eof and await self._fill():
                self._decode()
        self._decode()
        body, self._body = self._body, b""
        return body

    async def frames_until(
        self, predicate: object = None, count: int | None = None, limit: float | None = None
    ) -> list[bytes]:
        """Frames up to the end, `count` of them, or the first one `predicate` accepts;
        the deadline is per frame."""
        out: list[bytes] = []
        while count is None or len(out) < count:
            frame = await self.next_frame(limit)
            if frame is None:
                break
            out.append(frame)
            if callable(predicate) and predicate(frame):
                break
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()

    def abort(self) -> None:
        """Close with RST: SO_LINGER 0, the way a crashed client leaves."""
        sock = self.stream.socket
        if sock.fileno() == -1:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def request(
    port: int,
    path: str,
    *,
    token: str | None = None,
    cookie: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    version: str = "HTTP/1.1",
    rcvbuf: int | None = None,
    host: str = "127.0.0.1",
    limit: float = READ_LIMIT,
) -> Response:
    """Send a request and read the response head; the connect, the send and the head
    share one deadline, `limit` (also the default for the response's reads)."""
    with trio.fail_after(limit):
        return await _request(
            port, path, token, cookie, headers, method, version, rcvbuf, host, limit
        )


async def _request(
    port: int,
    path: str,
    token: str | None,
    cookie: str | None,
    headers: dict[str, str] | None,
    method: str,
    version: str,
    rcvbuf: int | None,
    host: str,
    limit: float,
) -> Response:
    if rcvbuf is None:
        stream = await trio.open_tcp_stream(host, port)
    else:
        # A small receive buffer set before connecting: the window stays small, so a
        # client that stops reading stalls the server's writer quickly.
        sock = trio.socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
    lines = [f"{method} {path} {version}", f"Host: {host}:{port}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if cookie is not None:
        lines.append(f"Cookie: chatwatch_session={cookie}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    response = Response(stream, limit)
    try:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await response._read_head()
    except BaseException:
        response.abort()
        raise
    return response


async def get(
    port: int,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    **kw: str | None,
) -> tuple[int, dict[str, str], bytes]:
    """A plain request; returns status, headers and the whole body."""
    response = await request(port, path, headers={"Connection": "close", **(headers or {})}, **kw)  # type: ignore[arg-type]
    try:
        body = await response.read_body()
    finally:
        await response.aclose()
    return response.status, response.headers, body
