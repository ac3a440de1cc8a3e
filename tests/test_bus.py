"""The NATS border (`app.bus`) against a real nats-server.

Rules: every wait on the network has a deadline; the windows the bugs lived in are
made deterministic (the server stopped with SIGSTOP so a PONG never comes, or a pause
point in nats-py), never raced. Blocking calls (the server's monitor, restarting it)
run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing
from nats.aio.client import DEFAULT_FLUSH_TIMEOUT

from app import bus as bus_module, natsborder, subscriptions
from app.bus import Bus, RetryLog, open_bus
from app.errors import BusUnavailable
from tests.natsproc import NatsProcess
from tests.polling import wait_until_async

SUBJECTS = [f"chat.*.0000000{i}-1111-4222-8333-944445555666" for i in range(3)]
LATE = "chat.*.00000009-1111-4222-8333-944445555666"


async def restart(nats: NatsProcess) -> None:
    """Kill the (possibly frozen) server and start it again on the same ports."""
    nats.kill()
    await trio.to_thread.run_sync(nats.start)


class Inbox:
    """A message handler that records what it got and wakes whoever waits for it."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self._arrived = trio.Event()

    def __call__(self, subject: str, payload: bytes, headers: Any = None) -> None:
        self.payloads.append(payload)
        self._arrived.set()

    async def wait(self) -> bytes:
        await self.wait_for(1)
        return self.payloads[-1]

    async def wait_for(self, count: int) -> None:
        while len(self.payloads) < count:
            await self._arrived.wait()
            self._arrived = trio.Event()


async def hold(
    bus: Bus, subject: str, handler: Inbox, scope: trio.CancelScope, live: trio.Event
) -> None:
    with scope:
        async with bus.subscription(subject, handler):
            live.set()
            await trio.sleep_forever()


async def connected_bus_subjects(nats: NatsProcess) -> list[str]:
    return await trio.to_thread.run_sync(nats.chat_subscriptions)


async def test_a_hang_up_during_a_batch_pong_wait_strands_none_of_the_others(
    nats: NatsProcess,
) -> None:
    async with open_bus([nats.url]) as bus:
        with trio.fail_after(10):
            await bus.wait_connected()
        # The connection stays open, nothing is answered (no PONG).
        await trio.to_thread.run_sync(nats.pause)
        batches = bus.batches
        inboxes = [Inbox() for _ in SUBJECTS]
        scopes = [trio.CancelScope() for _ in SUBJECTS]
        live = [trio.Event() for _ in SUBJECTS]
        async with trio.open_nursery() as nursery:
            # Started in one go: all three are queued before the bus's task runs, so
            # they go out as one batch behind one PING, which the frozen server never
            # answers.
            for args in zip(SUBJECTS, inboxes, scopes, live, strict=True):
                nursery.start_soon(hold, bus, *args)
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked(0.05)
            assert bus.batches == batches + 1
            assert not any(e.is_set() for e in live)
            scopes[0].cancel()  # the first topic's last watcher leaves
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked(0.05)
            await restart(nats)
            with trio.fail_after(10):
                await live[1].wait()
                await live[2].wait()
                for n in (1, 2):
                    await bus.publish(SUBJECTS[n].replace("*", "chunk"), b"after %d" % n)
                assert await inboxes[1].wait() == b"after 1"
                assert await inboxes[2].wait() == b"after 2"
            nursery.cancel_scope.cancel()
        assert not live[0].is_set()


def gate_first_call(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> Callable[[], None]:
    """Make the first call of `owner.name` wait until the returned function is called:
    a stand-in for nats-py's write queue being stuck at that point."""
    original = getattr(owner, name)
    gate: list[asyncio.Future[None]] = []

    async def gated(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not gate:
            gate.append(asyncio.get_running_loop().create_future())
            await gate[0]
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, gated)

    def release() -> None:
        assert gate, "the pause point was never reached"
        if not gate[0].done():  # (cancelled, if the batch was cut there)
            gate[0].set_result(None)

    return release


async def expect_failure(bus: Bus, done: trio.Event) -> None:
    """Ask for a subscription on LATE that must fail because its batch overran."""
    with pytest.raises(Exception, match="did not take"):
        async with bus.subscription(LATE, Inbox()):
            raise AssertionError("entered a subscription NATS never took")
    done.set()


async def test_unsubs_go_out_while_a_sub_batch_is_stuck(
    nats: NatsProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than the test's own limit: an UNSUB that waited for the stuck batch (as
    # when UNSUBs were batched too) would not reach the server before the test fails.
    monkeypatch.setattr(subscriptions, "_APPLY_DEADLINE", 60.0)
    async with open_bus([nats.url]) as bus:
        scopes = [trio.CancelScope() for _ in SUBJECTS]
        live = [trio.Event() for _ in SUBJECTS]
        async with trio.open_nursery() as nursery:
            for args in zip(SUBJECTS, [Inbox() for _ in SUBJECTS], scopes, live, strict=True):
                nursery.start_soon(hold, bus, *args)
            with trio.fail_after(10):
                for event in live:
                    await event.wait()
            await wait_until_async(lambda: len(nats.chat_subscriptions()) == 3)
            # A new SUB whose batch nats-py does not take (its write queue stuck).
            release = gate_first_call(monkeypatch, type(bus.nc), "_send_subscribe")
            late_scope, late_live = trio.CancelScope(), trio.Event()
            nursery.start_soon(hold, bus, LATE, Inbox(), late_scope, late_live)
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked(0.05)
            batches = bus.batches
            for scope in scopes:
                scope.cancel()
            await wait_until_async(lambda: nats.chat_subscriptions() == [])
            assert not late_live.is_set()  # its batch is still stuck
            assert bus.batches == batches
            release()
            with trio.fail_after(10):
                await late_live.wait()
            late_scope.cancel()
        await wait_until_async(lambda: nats.chat_subscriptions() == [])


async def test_leaving_writes_the_unsubs_in_that_step(nats: NatsProcess) -> None:
    subjects = [f"chat.*.00000000-1111-4222-8333-{i:012d}" for i in range(50)]
    async with open_bus([nats.url]) as bus, AsyncExitStack() as stack:
        with trio.fail_after(10):
            releases = [
                await stack.enter_async_context(bus.subscription(s, Inbox())) for s in subjects
            ]
        await wait_until_async(lambda: len(nats.chat_subscriptions()) == 50)
        batches, unsubscribes = bus.batches, bus.unsubscribes
        for release in releases:
            release()
        # No checkpoint since: gone from nats-py's table (nothing to replay on a
        # reconnect), the UNSUBs written (nothing left queued for nats-py's flusher), and
        # no batch, no PING, no task involved.
        assert not any(s.startswith("chat.") for s in natsborder.subscribed_subjects(bus.nc))
        assert bus.nc._pending_data_size == 0
        assert bus.unsubscribes == unsubscribes + 50
        assert bus.batches == batches
        for release in releases:
            release()  # idempotent, as is leaving the block
        await wait_until_async(lambda: nats.chat_subscriptions() == [])
    assert bus.unsubscribes == unsubscribes + 50


async def test_a_sub_held_past_the_deadline_fails_and_leaves_nothing_behind(
    nats: NatsProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscriptions, "_APPLY_DEADLINE", 0.2)
    async with open_bus([nats.url]) as bus:
        with trio.fail_after(10):
            await bus.wait_connected()
        release = gate_first_call(monkeypatch, type(bus.nc), "_send_subscribe")
        with trio.fail_after(10), pytest.raises(Exception, match="did not take"):
            async with bus.subscription(SUBJECTS[0], Inbox()):
                raise AssertionError("entered a subscription NATS never took")
        release()
        # The held SUB went out once released; the bus then takes it back, from the
        # server and from nats-py's table (which it would otherwise replay on reconnect).
        await wait_until_async(lambda: nats.chat_subscriptions() == [])
        with trio.fail_after(10):
            while any(s.startswith("chat.") for s in natsborder.subscribed_subjects(bus.nc)):
                await trio.testing.wait_all_tasks_blocked(0.05)


async def test_close_outlasts_drain_and_its_final_flush(nats: NatsProcess) -> None:
    async with open_bus([nats.url]) as bus:
        with trio.fail_after(10):
            await bus.wait_connected()
        drain_timeout = bus.nc.options["drain_timeout"]
    # drain() waits `drain_timeout` for the subscriptions, then flushes with nats-py's
    # default flush timeout; trio must not cancel that flush (NOTES: a cancelled flush).
    assert drain_timeout + DEFAULT_FLUSH_TIMEOUT < bus_module._CLOSE_DEADLINE


async def test_handlers_get_headers_and_call_runs_with_the_live_client(nats: NatsProcess) -> None:
    async with open_bus([nats.url]) as bus:
        with trio.fail_after(10):
            await bus.wait_connected()
        inbox = Inbox()
        headers: list[Any] = []

        def handler(subject: str, payload: bytes, hdrs: dict[str, str] | None) -> None:
            headers.append(hdrs)
            inbox(subject, payload)

        async def publish_with_headers(nc: Any, subject: str) -> str:
            await nc.publish(subject, b"h", headers={"Nats-Sequence": "7"})
            return "sent"

        subject = SUBJECTS[0].replace("*", "chunk")
        with trio.fail_after(10):
            async with bus.subscription(SUBJECTS[0], handler):
                assert await bus.call(publish_with_headers, subject) == "sent"
                await bus.publish(subject, b"plain")
                await inbox.wait_for(2)
        assert headers == [{"Nats-Sequence": "7"}, None]


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{s.getsockname()[1]}"


async def test_call_without_a_connection_raises_bus_unavailable() -> None:
    async with open_bus([refused_url()]) as bus:

        async def never(nc: Any) -> None:
            raise AssertionError("ran without a connection")

        with pytest.raises(BusUnavailable, match="not connected"):
            await bus.call(never)


def test_retry_log_warns_once_then_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = RetryLog(interval=30)
    with caplog.at_level(logging.INFO, logger="chatwatch.nats"):
        for tenth in range(0, 650):  # ten attempts a second for 65 s
            log.failed("NATS at x not reachable: connection refused", tenth / 10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "NATS at x not reachable: connection refused; retrying",
        "NATS at x not reachable: connection refused (301 failed attempts so far); retrying",
        "NATS at x not reachable: connection refused (601 failed attempts so far); retrying",
    ]
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


async def test_an_unreachable_nats_is_retried_with_backoff_and_few_log_lines(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    # No server at all, so virtual time cannot break anything real.
    with caplog.at_level(logging.INFO, logger="chatwatch.nats"):
        async with open_bus([refused_url()]) as bus:
            await trio.sleep(65)
            attempts = bus.nc.options["reconnect_time_wait"]
    lines = [r for r in caplog.records if r.name == "chatwatch.nats"]
    assert len(lines) == 3, [r.getMessage() for r in lines]
    assert all(r.levelno == logging.WARNING for r in lines)
    assert "connection refused" in lines[0].getMessage()
    assert attempts == pytest.approx(2.0)  # backed off to the longest wait
