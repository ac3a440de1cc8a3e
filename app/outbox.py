"""A watcher's outbox: the bounded queue between the hub and one SSE response.

Two limits bound it, whichever comes first: frames (the memory channel's size) and
bytes (counted here, on the way in and on the way out). Both sides of the count live
in this class, so no other module adds or subtracts bytes.
"""

from __future__ import annotations

import trio


class Outbox:
    __slots__ = ("_closed", "_drained", "_max_bytes", "_recv", "_send", "_window", "queued_bytes")

    def __init__(self, max_frames: int, max_bytes: int, window: float = 0.0) -> None:
        self._send, self._recv = trio.open_memory_channel[bytes](max_frames)
        self._max_bytes = max_bytes
        # Seconds a frame may wait for others to be written with it (--write-window).
        self._window = window
        self.queued_bytes = 0
        # What `put` waits on, set when the reader takes bytes. Made only when someone
        # waits: a take is per frame, a wait for room is rare.
        self._drained: trio.Event | None = None
        self._closed = False

    def offer(self, frame: bytes) -> bool:
        """Queue without blocking; False when either limit would be passed.

        A closed outbox takes nothing and says True: there is no one to cut off.
        """
        if self.queued_bytes + len(frame) > self._max_bytes:
            return False
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return True
        self.queued_bytes += len(frame)
        return True

    def put_last(self, frame: bytes) -> None:
        """Queue a stream's final frame if there is room at all, then close."""
        try:
            self._send.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        else:
            self.queued_bytes += len(frame)
        self.close()

    async def put(self, frame: bytes) -> None:
        """Queue, waiting for room in frames and in bytes (a replay is paced by its
        reader, and leaves the byte budget to live frames once it is read).

        Raises:
            trio.ClosedResourceError: the outbox was closed (the watcher was cut off).
        """
        await self.wait_room(self._max_bytes - len(frame))
        await self._send.send(frame)
        self.queued_bytes += len(frame)

    async def wait_room(self, queued_at_most: int) -> None:
        """Until no more than `queued_at_most` bytes wait (or nothing does)."""
        while self.queued_bytes > max(queued_at_most, 0):
            if self._closed:
                raise trio.ClosedResourceError("the outbox is closed")
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def _took(self, size: int) -> None:
        self.queued_bytes -= size
        drained = self._drained
        if drained is not None:
            self._drained = None
            drained.set()

    def close(self) -> None:
        self._send.close()
        self._closed = True
        if self._drained is not None:
            self._drained.set()  # a `put` waiting for room learns it is closed

    def receive_nowait(self) -> bytes:
        """One frame. Raises trio.WouldBlock (empty) or trio.EndOfChannel (closed)."""
        frame = self._recv.receive_nowait()
        self._took(len(frame))
        return frame

    async def take(self, coalesce: int) -> bytes:
        """The next frame, joined with whatever else is already queued up to `coalesce`
        bytes: under load this turns thousands of small writes into a few large ones.

        Raises:
            trio.EndOfChannel: closed and empty.
        """
        first = await self._recv.receive()
        if self._window > 0:
            return await self._gather(first, coalesce)
        if self.queued_bytes <= len(first):
            # Nothing else counted in: the usual case for a watcher that keeps up, without
            # the exception a second receive_nowait would raise. (A frame from `put` is
            # counted a step after it is queued: it is taken by the next take instead.)
            self._took(len(first))
            return first
        try:
            second = self._recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            self._took(len(first))
            return first
        parts = [first, second]
        size = len(first) + len(second)
        try:
            while size < coalesce:
                frame = self._recv.receive_nowait()
                parts.append(frame)
                size += len(frame)
        except (trio.WouldBlock, trio.EndOfChannel):
            pass
        self._took(size)
        return b"".join(parts)

    async def _gather(self, first: bytes, coalesce: int) -> bytes:
        """The write window: after a first frame, wait up to the window for more, so a
        stream of small frames costs one write per window instead of one per frame."""
        parts = [first]
        size = len(first)
        with trio.move_on_after(self._window):
            try:
                while size < coalesce:
                    frame = await self._recv.receive()
                    parts.append(frame)
                    size += len(frame)
            except trio.EndOfChannel:
                pass  # the end comes at the next take
        self._took(size)
        return parts[0] if len(parts) == 1 else b"".join(parts)
