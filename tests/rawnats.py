"""A minimal NATS publisher over a trio socket, independent of the code under test.

One connection: publishes go out in the order they are made (the contract's ordering
guarantee is for publishes from one connection). `flush` is PING/PONG. Every call that
waits on the server has a deadline (`TIMEOUT`), so a stuck server fails the test
instead of hanging it.
"""

from __future__ import annotations

import json

import trio

# Generous: the server answers in milliseconds, a loaded two-core machine in seconds.
TIMEOUT = 15.0


class RawNats:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""

    @classmethod
    async def connect(cls, port: int, *, headers: bool = False) -> RawNats:
        """`headers`: the connection may send HPUB (messages with headers)."""
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            self = cls(stream)
            try:
                await self._read_line()  # INFO
                options = {"verbose": False, "pedantic": False, "headers": headers}
                await stream.send_all(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
                await self._flush()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return self

    async def _read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            data = await self._stream.receive_some(65536)
            if not data:
                raise EOFError("NATS closed the connection")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    @staticmethod
    def pub_bytes(subject: str, payload: bytes) -> bytes:
        return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)

    async def publish(self, subject: str, payload: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self._stream.send_all(self.pub_bytes(subject, payload))

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        with trio.fail_after(TIMEOUT):
            await self._stream.send_all(b"".join(self.pub_bytes(s, p) for s, p in items))

    async def flush(self) -> None:
        """PING, then wait for the PONG: everything published before is at the server."""
        with trio.fail_after(TIMEOUT):
            await self._flush()

    async def _flush(self) -> None:
        await self._stream.send_all(b"PING\r\n")
        while True:
            line = await self._read_line()
            if line == b"PONG":
                return
            if line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())

    async def aclose(self) -> None:
        await self._stream.aclose()
