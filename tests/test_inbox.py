"""app.inbox: a request's ASGI messages without a memory channel, queued as a trio
channel would queue them or handed straight to a listener.

Unit tests of `Inbox` on trio alone; end to end, hypercorn's trio worker serving a
bare ASGI app (with the adapter and without: same behaviour) and the chatwatch
request handling (app/asgiconn.py) listening on an inbox.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypercorn.trio.task_group import TaskGroup
from hypercorn.typing import ASGIReceiveEvent
from quart import Response, request
from quart_trio import QuartTrio

from app import asgiconn, inbox, upstream
from app.inbox import Inbox
from tests.asgitest import get_scope, lean_only
from tests.rawhttp import LIMIT, StreamApp, connect, frame, request as http_request, serving

ROOT = Path(__file__).resolve().parent.parent


def msg(i: int) -> ASGIReceiveEvent:
    return {"type": "http.request", "body": str(i).encode(), "more_body": True}


def test_hypercorn_is_the_version_and_code_the_adapter_mirrors() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hypercorn=={version('hypercorn')}" in deps
    assert upstream.mismatches(inbox.EXPECTED_SOURCE_SHA256, inbox.mirrored()) == []


# ------------------------------------------------------------ Inbox alone


async def test_messages_come_out_in_order_through_a_full_queue() -> None:
    box = Inbox(2)
    got: list[ASGIReceiveEvent] = []

    async def sender() -> None:
        for i in range(20):
            await box.put(msg(i))

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            for _ in range(20):
                got.append(await box.receive())
                await trio.lowlevel.checkpoint()
    assert got == [msg(i) for i in range(20)]


async def test_a_put_waits_while_full_and_a_cancelled_one_delivers_nothing() -> None:
    box = Inbox(1)
    await box.put(msg(0))
    with trio.move_on_after(0.01) as waited:
        await box.put(msg(1))
    assert waited.cancelled_caught
    assert await box.receive() == msg(0)
    await box.put(msg(2))
    assert await box.receive() == msg(2)


async def test_a_cancelled_receive_loses_nothing() -> None:
    box = Inbox(1)
    with trio.move_on_after(0.01) as waited:
        await box.receive()
    assert waited.cancelled_caught
    await box.put(msg(0))
    assert await box.receive() == msg(0)


async def test_put_and_receive_are_checkpoints() -> None:
    box = Inbox(2)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.put(msg(0))
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.receive()
    await box.put(msg(1))  # the cancelled put queued nothing
    with trio.testing.assert_checkpoints():
        assert await box.receive() == msg(1)


async def test_a_listener_gets_the_queued_then_the_waiting_then_each_new_message() -> None:
    box = Inbox(1)
    got: list[ASGIReceiveEvent] = []
    await box.put(msg(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.put, msg(1))  # waits: the queue is full
        await trio.testing.wait_all_tasks_blocked()
        box.listen(got.append)
    assert got == [msg(0), msg(1)]
    await box.put(msg(2))
    assert got == [msg(0), msg(1), msg(2)]
    with pytest.raises(trio.BusyResourceError):
        await box.receive()
    with pytest.raises(trio.BusyResourceError):
        box.listen(got.append)


def test_inbox_of_finds_only_an_inboxs_receive() -> None:
    box = Inbox(1)
    assert inbox.inbox_of(box.receive) is box
    assert inbox.inbox_of(box.put) is box
    assert inbox.inbox_of(lambda: None) is None
    assert inbox.inbox_of(object()) is None


# ------------------------------------------------------------ under hypercorn


@pytest.fixture(params=["inbox", "hypercorn"])
def receive_side(request: pytest.FixtureRequest) -> Iterator[str]:
    inbox.uninstall()
    if request.param == "inbox":
        assert inbox.install()
        assert TaskGroup.spawn_app is not inbox._replacement.original
    yield request.param
    inbox.uninstall()


async def test_a_large_body_arrives_whole(receive_side: str) -> None:
    body = bytes(range(256)) * 2048  # 512 KiB: many reads, many messages
    async with serving(StreamApp()) as port, await connect(port) as stream:
        status, echoed = await http_request(
            stream, h11.Connection(h11.CLIENT), "POST", "/echo", body
        )
    assert (status, echoed == body) == (200, True)


async def test_a_client_going_away_ends_the_app(receive_side: str) -> None:
    app = StreamApp()
    async with serving(app) as port:
        stream = await connect(port)
        with trio.fail_after(LIMIT):
            await stream.send_all(b"GET /forever HTTP/1.1\r\nHost: test\r\n\r\n")
            received = b""
            while frame(3) not in received:
                received += await stream.receive_some(65536)
            await stream.aclose()
            await app.ended.wait()


def _quart_app(state: dict[str, Any]) -> QuartTrio:
    app = QuartTrio("t")
    app.asgi_http_class = asgiconn.LeanHTTPConnection

    async def body() -> Any:
        yield b"first"
        state["idling"].set()
        try:
            await trio.sleep_forever()
        finally:
            state["cancelled"] = True

    @app.get("/stream")
    async def stream() -> Response:
        response = Response(body(), content_type="text/event-stream")
        response.timeout = None
        return response

    @app.post("/echo")
    async def echo() -> Response:
        return Response(await request.get_data(), content_type="text/plain")

    return app


@lean_only
async def test_the_request_handling_listens_and_a_disconnect_cancels_it() -> None:
    """No task beside the response: the inbox's listener appends the body and turns
    the disconnect into a cancellation of the response."""
    state: dict[str, Any] = {"idling": trio.Event()}
    app = _quart_app(state)
    scope = get_scope("/stream")
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    box = Inbox(10)
    await box.put({"type": "http.request", "body": b"", "more_body": False})
    with trio.fail_after(LIMIT):
        async with app.test_app(), trio.open_nursery() as nursery:
            connection = asgiconn.LeanHTTPConnection(app, cast(Any, scope))
            nursery.start_soon(connection, box.receive, send)
            await state["idling"].wait()
            await trio.testing.wait_all_tasks_blocked()
            # The response's own task, and no reader beside it.
            assert len(nursery.child_tasks) == 1
            (task,) = nursery.child_tasks
            assert task.child_nurseries == []
            await box.put({"type": "http.disconnect"})
    assert state["cancelled"]
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"first"
