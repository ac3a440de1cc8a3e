"""app/asgiconn.py: the lean request handling keeps quart-trio's behaviour and holds
neither the request nor the response while a body streams."""

from __future__ import annotations

import gc
import weakref
from importlib.metadata import version
from typing import Any, cast

import trio
from quart import Response, request
from quart.wrappers.response import ResponseBody
from quart_trio import QuartTrio

from app import asgiconn
from tests.asgitest import get_scope, lean_only


def _mirrored_versions() -> bool:
    return all(version(name) == v for name, v in asgiconn.MIRRORED.items())


def test_upstream_is_the_version_mirrored() -> None:
    if _mirrored_versions():
        # The code this adapter mirrors is the code installed.
        assert asgiconn.mismatches() == []
        assert asgiconn.is_supported()
    else:
        # Another quart or quart-trio (0.13 on Python 3.13): the app keeps quart-trio's
        # own class. To have the saving there too, check the new code against the
        # adapter, then add its versions and hashes.
        assert not asgiconn.is_supported()


class _Body(ResponseBody):
    """Yields one chunk, then waits until told to end (a stream that idles)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.sent = False

    async def __aenter__(self) -> _Body:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.state["exited"] = True

    def disconnected(self) -> None:
        # Whether the body was told before the cancellation reached it.
        self.state["told_first"] = "cancelled" not in self.state

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if not self.sent:
            self.sent = True
            return b"first"
        self.state["idling"].set()
        try:
            await self.state["end"].wait()
        except trio.Cancelled:
            self.state["cancelled"] = True
            raise
        raise StopAsyncIteration


def _app(state: dict[str, Any]) -> QuartTrio:
    app = QuartTrio("t")
    app.asgi_http_class = asgiconn.LeanHTTPConnection

    @app.get("/stream")
    async def stream() -> Response:
        state["request"] = weakref.ref(request._get_current_object())  # type: ignore[attr-defined]
        response = Response(_Body(state), content_type="text/event-stream")
        state["response"] = weakref.ref(response)
        response.timeout = None
        return response

    @app.post("/echo")
    async def echo() -> Response:
        return Response(await request.get_data(), content_type="text/plain")

    return app


def _state() -> dict[str, Any]:
    return {"idling": trio.Event(), "end": trio.Event()}


@lean_only
async def test_a_streaming_body_holds_no_request_or_response() -> None:
    state = _state()
    app = _app(state)
    with trio.fail_after(10):
        await _holds_nothing(app, state)


async def _holds_nothing(app: QuartTrio, state: dict[str, Any]) -> None:
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.request("/stream") as conn:
            await conn.send_complete()
            assert await conn.receive() == b"first"
            with trio.fail_after(5):
                await state["idling"].wait()
            gc.collect()
            assert state["request"]() is None
            assert state["response"]() is None
            state["end"].set()
            with trio.fail_after(5):
                assert await conn.receive() == b""
        assert state["exited"]


@lean_only
async def test_a_disconnect_cancels_the_body() -> None:
    state = _state()
    app = _app(state)
    with trio.fail_after(10):
        await _disconnects(app, state)
    assert state["cancelled"]
    # A body that can be told (the SSE stream's) is told in the reader's step, before
    # the cancellation reaches it a scheduler pass later.
    assert state["told_first"] is True


async def _disconnects(app: QuartTrio, state: dict[str, Any]) -> None:
    # Driven as hypercorn drives it (quart's test client waits for a final body that
    # a disconnected request never sends).
    scope = get_scope("/stream")
    to_app, from_client = trio.open_memory_channel[dict[str, Any]](10)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with app.test_app(), trio.open_nursery() as nursery:
        await to_app.send({"type": "http.request", "body": b"", "more_body": False})
        nursery.start_soon(cast(Any, app), scope, from_client.receive, send)
        await state["idling"].wait()
        await to_app.send({"type": "http.disconnect"})
    assert state["exited"]
    assert [m.get("body") for m in sent if m["type"] == "http.response.body"] == [b"first"]


@lean_only
async def test_a_request_body_still_reaches_the_route() -> None:
    app = _app(_state())
    async with app.test_app() as test_app:
        response = await test_app.test_client().post("/echo", data=b"x" * 100_000)
        assert response.status_code == 200
        assert await response.get_data() == b"x" * 100_000


def test_streamed_heads_are_shared_sized_ones_are_not() -> None:
    one = Response(_Body(_state()), content_type="text/event-stream")
    two = Response(_Body(_state()), content_type="text/event-stream")
    assert asgiconn.start_message(one) is asgiconn.start_message(two)
    head = asgiconn.start_message(one)
    assert head["status"] == 200
    assert (b"content-type", b"text/event-stream") in head["headers"]
    sized = Response(b"abc")
    assert "Content-Length" in sized.headers
    assert asgiconn.start_message(sized) is not asgiconn.start_message(Response(b"abc"))
