"""A TCP proxy the test controls: cut every connection through it, refuse new ones for
a while, then let them through again. Stands for a network path to NATS that breaks
(a failover, a blip) while the NATS server itself keeps storing what producers send.
"""

from __future__ import annotations

import trio


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._open = trio.Event()
        self._open.set()
        self._live: set[trio.CancelScope] = set()
        self.port = -1
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self._open.is_set():
                return  # refused: closed at once
            with trio.fail_after(5):
                upstream = await trio.open_tcp_stream("127.0.0.1", self._upstream)
            self.connections += 1
            scope = trio.CancelScope()
            self._live.add(scope)
            try:
                with scope:
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, upstream, nursery)
                        nursery.start_soon(self._pipe, upstream, client, nursery)
            finally:
                self._live.discard(scope)

    @staticmethod
    async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, nursery: trio.Nursery) -> None:
        try:
            async for data in src:
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore`."""
        self._open = trio.Event()
        for scope in self._live:
            scope.cancel()

    def restore(self) -> None:
        self._open.set()
