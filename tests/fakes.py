"""Fakes for unit tests of the hub (a pure layer). Never used where NATS is crossed."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager

import trio

Handler = Callable[[str, bytes, dict[str, str] | None], None]


class FakeBus:
    """In-memory `hub.BusLike`: tests deliver messages and flip the connection."""

    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.handlers: dict[str, Handler] = {}
        self.subscribe_calls = 0
        self.unsubscribe_calls = 0
        self.gate = trio.Event()  # set: subscriptions confirm at once
        self.gate.set()
        self.fail_with: Exception | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._changed = trio.Event()

    def add_status_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def set_connected(self, value: bool) -> None:
        self.connected = value
        self._changed.set()
        self._changed = trio.Event()
        for listener in self._listeners:
            listener(value)

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._changed.wait()

    @asynccontextmanager
    async def subscription(
        self, subject: str, handler: Handler
    ) -> AsyncGenerator[Callable[[], None], None]:
        self.subscribe_calls += 1
        while not self.connected:
            await self._changed.wait()
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.handlers[subject] = handler
        released = False

        def release() -> None:
            # Sync and idempotent, like the real bus's: the UNSUB in the leaving step.
            nonlocal released
            if released:
                return
            released = True
            if self.handlers.get(subject) is handler:
                del self.handlers[subject]
            self.unsubscribe_calls += 1

        try:
            yield release
        finally:
            release()

    def deliver(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        conversation_id = subject.rsplit(".", 1)[1]
        self.handlers[f"chat.*.{conversation_id}"](subject, payload, headers)
