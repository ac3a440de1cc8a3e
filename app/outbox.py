"""A watcher's outbox: the bounded queue between the hub and one SSE response.

Two limits bound it, whichever comes first: frames and bytes, both counted here, on
the way in and on the way out, so no other module adds or subtracts bytes.

A deque and the one reading task parked on trio's low-level API, not a trio memory
channel: the channel's bookkeeping (its state object, per-task tables, an outcome
wrapper per hand-off) was about a tenth of a frame's CPU in the `many` and `paced`
shapes (tests/bench/frame_layers.py). There is one reader, the stream's body; a
second concurrent `take` raises trio.BusyResourceError.

An idle outbox holds no deque (an empty one is 760 bytes, a twentieth of an idle
watcher): the reader drops it when it parks on an empty outbox, the next frame in
makes a new one (docs/findings.md, "What an idle watcher holds"). The parked
reader's abort is a bound method, not a closure made at every wait.
"""

from __future__ import annotations

from collections import deque

import trio


class Outbox:
    __slots__ = (
        "_closed",
        "_drained",
        "_frames",
        "_max_bytes",
        "_max_frames",
        "_reader",
        "_window",
        "queued_bytes",
    )

    def __init__(self, max_frames: int, max_bytes: int, window: float = 0.0) -> None:
        # None while empty and the reader is parked (see the module docstring).
        self._frames: deque[bytes] | None = None
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        # Seconds a frame may wait for others to be written with it (--write-window).
        self._window = window
        self.queued_bytes = 0
        # What `put` waits on, set when the reader takes frames. Made only when someone
        # waits: a take is per frame, a wait for room is rare.
        self._drained: trio.Event | None = None
        # The task parked in `take` for the next frame, if it is parked.
        self._reader: trio.lowlevel.Task | None = None
        self._closed = False

    def _append(self, frame: bytes) -> None:
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        frames.append(frame)
        self.queued_bytes += len(frame)
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def offer(self, frame: bytes) -> bool:
        """Queue without blocking; False when either limit would be passed.

        A closed outbox takes nothing and says True: there is no one to cut off.
        """
        if self._closed:
            return True
        frames = self._frames
        if self.queued_bytes + len(frame) > self._max_bytes or (
            frames is not None and len(frames) >= self._max_frames
        ):
            return False
        self._append(frame)
        return True

    def put_last(self, frame: bytes) -> None:
        """Queue a stream's final frame if there is room at all, then close."""
        frames = self._frames
        if not self._closed and (frames is None or len(frames) < self._max_frames):
            self._append(frame)
        self.close()

    async def put(self, frame: bytes) -> None:
        """Queue, waiting for room in frames and in bytes (a replay is paced by its
        reader, and leaves the byte budget to live frames once it is read).

        Raises:
            trio.ClosedResourceError: the outbox was closed (the watcher was cut off).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.wait_room(self._max_bytes - len(frame))
        while self._frames is not None and len(self._frames) >= self._max_frames:
            await self._wait_drained()
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        self._append(frame)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_room(self, queued_at_most: int) -> None:
        """Until no more than `queued_at_most` bytes wait (or nothing does)."""
        while self.queued_bytes > max(queued_at_most, 0):
            await self._wait_drained()

    async def _wait_drained(self) -> None:
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
        """No more frames in; what is queued stays readable, then the reader's end."""
        self._closed = True
        if self._drained is not None:
            self._drained.set()  # a `put` waiting for room learns it is closed
        reader = self._reader
        if reader is not None:  # parked on an empty outbox: it ends now
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def receive_nowait(self) -> bytes:
        """One frame. Raises trio.WouldBlock (empty) or trio.EndOfChannel (closed)."""
        frames = self._frames
        if frames:
            frame = frames.popleft()
            self._took(len(frame))
            return frame
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def _receive(self) -> bytes:
        """The next frame, not yet counted out (the caller does, once per write).

        Always a checkpoint, as a channel's receive is; a frame is taken only after it,
        so a cancellation never loses one.
        """
        frames = self._frames
        if frames:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while not frames:
            if self._closed:
                raise trio.EndOfChannel
            if self._reader is not None:
                raise trio.BusyResourceError("another task is taking from this outbox")
            # Empty: an idle outbox holds no deque (nor does this frame, while parked).
            frames = self._frames = None
            self._reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_receive)
            frames = self._frames  # a new one, if a frame came (None if closed)
        return frames.popleft()

    def _abort_receive(self, _: object) -> trio.lowlevel.Abort:
        # Called only while the reader is still parked (never after `_append` or
        # `close` rescheduled it), and there is only one reader: it is the one.
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def take(self, coalesce: int) -> bytes:
        """The next frame, joined with whatever else is already queued up to `coalesce`
        bytes: under load this turns thousands of small writes into a few large ones.

        Raises:
            trio.EndOfChannel: closed and empty.
        """
        first = await self._receive()
        if self._window > 0:
            return await self._gather(first, coalesce)
        frames = self._frames
        if not frames:
            self._took(len(first))
            return first
        parts = [first]
        size = len(first)
        while frames and size < coalesce:
            frame = frames.popleft()
            parts.append(frame)
            size += len(frame)
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
                    frame = await self._receive()
                    parts.append(frame)
                    size += len(frame)
            except trio.EndOfChannel:
                pass  # the end comes at the next take
        self._took(size)
        return parts[0] if len(parts) == 1 else b"".join(parts)
