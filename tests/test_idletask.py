"""app.idletask: hypercorn's keep-alive timer, synchronously; same behaviour, fewer steps.

Servers here are hypercorn's trio worker serving a bare ASGI app with a short
keep-alive timeout, clients raw trio sockets. Every behaviour test runs with the
adapter and without it.
"""

from __future__ import annotations

import tomllib
from contextlib import AbstractAsyncContextManager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypercorn.trio import tcp_server

from app import idletask
from tests import rawhttp
from tests.bothways import both_ways

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 15.0  # a hang guard, not a performance limit
KEEP_ALIVE = 0.3
REQUEST = b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n"


timer = both_ways(idletask, "timer")


class App:
    """``GET /slow``: answers after `hold` seconds (longer than the keep-alive timeout);
    anything else at once. Both with a content length: the connection stays open.

    The timer tests run on trio's autojump MockClock: every wait here (the app's
    `hold`, the client's pause, hypercorn's keep-alive timeout) is virtual time, so
    they take no wall-clock time and a loaded machine cannot stretch them."""

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/slow":
            await trio.sleep(self.hold)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def serving(app: Any) -> AbstractAsyncContextManager[int]:
    return rawhttp.serving(app, keep_alive=KEEP_ALIVE)


async def connect(port: int) -> trio.SocketStream:
    with trio.fail_after(LIMIT):
        return await trio.open_tcp_stream("127.0.0.1", port)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(LIMIT):
        while data := await stream.receive_some(65536):
            received += data
    return received


async def read_response(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(LIMIT):
        while not received.endswith(b"\r\n\r\nok"):
            data = await stream.receive_some(65536)
            assert data, f"closed after {received!r}"
            received += data
    return received


def test_hypercorn_is_the_version_and_code_the_adapter_mirrors() -> None:
    """Fails when hypercorn moves: the pin, the installed version and the hash of the
    sources the adapter mirrors must move together (then re-read them)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hypercorn=={version('hypercorn')}" in deps
    assert idletask.source_sha256() == idletask.EXPECTED_SOURCE_SHA256


def in_use() -> object:
    """The class hypercorn's TCPServer makes each connection's timer from."""
    return vars(tcp_server)["TrioSingleTask"]


def test_install_refuses_code_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    idletask.uninstall()
    monkeypatch.setattr(idletask, "EXPECTED_SOURCE_SHA256", "0" * 64)
    assert not idletask.install()
    assert in_use() is not idletask.IdleTask
    monkeypatch.undo()
    assert idletask.install()
    assert in_use() is idletask.IdleTask
    idletask.uninstall()
    assert in_use() is not idletask.IdleTask


async def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(
    timer: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(App()) as port, await connect(port) as stream:
        started = trio.current_time()
        assert await read_until_closed(stream) == b""
        assert trio.current_time() - started >= KEEP_ALIVE * 0.9


async def test_a_request_in_progress_is_never_cut_by_the_timer(
    timer: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(App(hold=KEEP_ALIVE * 4)) as port, await connect(port) as stream:
        await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        assert (await read_response(stream)).startswith(b"HTTP/1.1 200")


async def test_the_timer_restarts_between_requests(
    timer: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Two requests on one connection, the second after most of a timeout, then the
    close one timeout after the last answer: each answer restarted the timer."""
    async with serving(App()) as port, await connect(port) as stream:
        for _ in range(2):
            await stream.send_all(REQUEST)
            assert (await read_response(stream)).startswith(b"HTTP/1.1 200")
            await trio.sleep(KEEP_ALIVE * 0.6)
        assert await read_until_closed(stream) == b""


class Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_request_costs_fewer_task_steps_with_the_adapter() -> None:
    """What the adapter is for (deterministic: counted, not timed)."""

    async def steps_for_requests(adapter: bool) -> int:
        idletask.uninstall()
        if adapter:
            assert idletask.install()
        try:
            async with serving(App()) as port:
                counter = Steps()
                trio.lowlevel.add_instrument(counter)
                try:
                    for _ in range(20):
                        async with await connect(port) as stream:
                            await stream.send_all(REQUEST)
                            await read_response(stream)
                finally:
                    trio.lowlevel.remove_instrument(counter)
                return counter.steps
        finally:
            idletask.uninstall()

    without = await steps_for_requests(False)
    with_adapter = await steps_for_requests(True)
    # Three of hypercorn's passes per connection go (two lock acquisitions and the
    # start handshake); allow one step of slack per connection for scheduling.
    assert with_adapter <= without - 2 * 20
