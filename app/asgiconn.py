"""quart-trio's per-request ASGI handling, holding less for a long-lived response.

An idle SSE stream keeps its request handler suspended for hours, so whatever that
handler references lives as long (docs/findings.md, "What an idle watcher holds").
quart-trio's `TrioASGIHTTPConnection` runs two tasks per request in a nursery (one
reads ASGI messages, one handles the request and sends the response) and both keep
the whole `Request` (its headers, args, body, events) referenced until the response
ends; the `Response` object stays referenced while its body streams. This class,
set as the app's ``asgi_http_class`` (Quart's documented extension point), does the
same work with:

- two tasks fewer, and no nursery: the response is handled in the task hypercorn
  started for the request, and the request's messages are handed to it by
  hypercorn's put itself (`app/inbox.py`, the connection's `Inbox`): the body is
  appended, and a disconnect cancels the request's scope, so the response sees
  Cancelled as before. Where ``receive`` is not an `Inbox`'s (the inbox adapter
  off, a test client), one task relays it into one;
- the `Request` dropped once the route has returned (the reader keeps only the
  body, and only until it is complete), and the `Response` dropped once its head is
  sent (the body alone is drained);
- the response head for a bodiless-length response (no Content-Length: the SSE
  stream) built once and shared, since hypercorn keeps the start message for the
  life of the stream;
- a streamed body with a synchronous ``disconnected()`` method (`Disconnectable`)
  is told by `_Messages` in the step that hands over the client's disconnect, right
  after cancelling the request: what it owes others (the hub's `leave`, and with the
  last watcher the conversation's UNSUB) is not held back by the scheduler pass it
  takes the cancellation to reach the body, a pass that lasts hundreds of
  milliseconds when thousands of streams close at once (docs/findings.md).

Why a subclass checked against source hashes: the methods it replaces are
quart-trio's and quart's own code, and their semantics (timeouts, which message ends
the reader, how the body is sent) are what this mirrors. `is_supported` hashes them;
when any differs from the versions mirrored (`MIRRORED`) the app keeps quart-trio's
own class (a warning says so): another version costs the saving, never correctness.
quart-trio is not pinned (0.13 is the one for Python 3.13), so the tests check the
hashes wherever the mirrored versions are installed, and the fallback elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any, Protocol, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable
from quart import Quart
from quart.asgi import ASGIHTTPConnection
from quart.utils import encode_headers
from quart.wrappers import Body, Request, Response
from quart.wrappers.response import ResponseBody
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.wrappers import Response as WerkzeugResponse

from app import upstream
from app.inbox import Inbox, inbox_of

log = logging.getLogger("chatwatch.asgiconn")

# The versions whose code this module mirrors.
MIRRORED = {"quart": "0.22.0", "quart-trio": "0.12.0"}

# sha256 of the dedented source of each upstream method this class mirrors.
EXPECTED_SOURCE_SHA256: dict[str, str] = {
    "TrioASGIHTTPConnection.__call__": (
        "f47d3e5ac8abab83be0ec94c6adbbd77186100626089c1bc895ee388389a2d6d"
    ),
    "TrioASGIHTTPConnection.handle_messages": (
        "e43ade68307aef6a590e799aeb70b856f0086a932bce4d5f7e19d20a169be996"
    ),
    "TrioASGIHTTPConnection.handle_request": (
        "53ff2167bac19bf7d3041ea2863f88134611b08af8e437adac0ef885b7748687"
    ),
    "ASGIHTTPConnection.handle_messages": (
        "fe903b4c90a16b8d630c2e1420e3c393df94389dcd613479ae1de83ba873e4c1"
    ),
    "ASGIHTTPConnection._send_response": (
        "b530fd3c24f30f10e521c77854c0f8147bfe9350e1c83d890154a3d30e7b737c"
    ),
    # What app/http.py's CloseSafeASGI does in its place: make this class, call it.
    "Quart.asgi_app": "cf9f1a3ba14fc2ef47b0b5ce8b055312efe36544358acf5c1eb516446c176f6f",
}

# Shared response heads: (status, header items) -> the ASGI start message. Bounded:
# only heads without a Content-Length are shared (a streamed body's head repeats;
# a sized one varies with every body), and no more than this many distinct ones.
_HEADS_MAX = 32
_heads: dict[tuple[int, tuple[tuple[str, str], ...]], dict[str, Any]] = {}


class Disconnectable(Protocol):
    """A response body told at once when its client disconnects (see the docstring)."""

    def disconnected(self) -> None:
        """Sync; called once the request is cancelled, before the body sees it."""


def upstream_methods() -> dict[str, Callable[..., object]]:
    return {
        "TrioASGIHTTPConnection.__call__": TrioASGIHTTPConnection.__call__,
        "TrioASGIHTTPConnection.handle_messages": (TrioASGIHTTPConnection.handle_messages),
        "TrioASGIHTTPConnection.handle_request": TrioASGIHTTPConnection.handle_request,
        "ASGIHTTPConnection.handle_messages": ASGIHTTPConnection.handle_messages,
        "ASGIHTTPConnection._send_response": ASGIHTTPConnection._send_response,
        "Quart.asgi_app": Quart.asgi_app,
    }


def mismatches() -> list[str]:
    """The upstream methods whose source is not the one this module mirrors."""
    return upstream.mismatches(EXPECTED_SOURCE_SHA256, upstream_methods())


def is_supported() -> bool:
    wrong = mismatches()
    if wrong:
        log.warning(
            "lean request handling left off: %s not the version this adapter mirrors",
            ", ".join(wrong),
        )
    return not wrong


def start_message(response: Response | WerkzeugResponse) -> dict[str, Any]:
    """The ASGI ``http.response.start`` message, shared between equal streamed heads."""
    items = tuple(response.headers.items())
    key = (response.status_code, items)
    head = _heads.get(key)
    if head is not None:
        return head
    head = {
        "type": "http.response.start",
        "status": response.status_code,
        # A tuple: hypercorn only iterates it, and a shared head must not change.
        "headers": tuple(encode_headers(response.headers)),
    }
    if "Content-Length" not in response.headers and len(_heads) < _HEADS_MAX:
        _heads[key] = head
    return head


class LeanHTTPConnection(TrioASGIHTTPConnection):
    """`TrioASGIHTTPConnection` with one task and no request or response kept for
    the length of a streamed body (see the module docstring)."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        inbox = inbox_of(receive)
        if inbox is None:
            await self._relayed(receive, send)
            return
        # One coroutine for what upstream splits over four (quart's `_send_response`
        # too), and no task beside it: the request's messages come to `_Messages`
        # straight from hypercorn's put (app/inbox.py); a disconnect cancels `scope`.
        with trio.CancelScope() as scope:
            request: Request | None = self._create_request_from_scope(send)
            assert request is not None
            messages = _Messages(scope, request.body)
            inbox.listen(messages)
            response = await self.app.handle_request(request)
            request = None  # the route has returned: nothing reads the request any more
            if isinstance(response, Response) and response.timeout != Ellipsis:
                timeout = cast(float | None, response.timeout)
            else:
                timeout = self.app.config["RESPONSE_TIMEOUT"]
            head = start_message(response)
            body: Iterable[Any] | ResponseBody = response.response
            if hasattr(body, "disconnected"):
                # The body alone (no bound method kept per stream), for the reader.
                messages.told = cast(Disconnectable, body)
            sized = isinstance(response, WerkzeugResponse)
            del response  # the head is built: only the body is needed from here on
            deadline = trio.move_on_after(timeout) if timeout is not None else nullcontext()
            with deadline:
                await send(cast(Any, head))
                if sized:
                    assert not isinstance(body, ResponseBody)
                    for data in body:
                        chunk = data.encode() if isinstance(data, str) else data
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                else:
                    assert isinstance(body, ResponseBody)
                    async with body as response_body:
                        async for data in response_body:
                            chunk = data.encode() if isinstance(data, str) else data
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                # Shielded (what app/http.py's CloseSafeASGI does for any handler):
                # hypercorn delivers the disconnect from inside this very send, and
                # its close must not be cancelled.
                with trio.CancelScope(shield=True):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relayed(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        """Where ``receive`` is not an `Inbox`'s (hypercorn's own channel, a test
        client): a task relays its messages into one, as quart-trio's reader task
        would read them, until the disconnect or the end of the response."""
        inbox = Inbox(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay, receive, inbox)
            await self(inbox.receive, send)
            nursery.cancel_scope.cancel()


async def _relay(receive: ASGIReceiveCallable, inbox: Inbox) -> None:
    while True:
        message = await receive()
        await inbox.put(message)
        if message["type"] == "http.disconnect":
            return


class _Messages:
    """What quart's reader does with a request's messages (`ASGIHTTPConnection.
    handle_messages`, then quart-trio's cancel), called by the `Inbox` as each is put:
    the body is appended until complete (then dropped), a disconnect cancels the
    request's scope, and then tells a streamed body that wants to know
    (`Disconnectable`) in that same step. Never raises: it runs in hypercorn's
    reading task."""

    __slots__ = ("body", "scope", "told")

    def __init__(self, scope: trio.CancelScope, body: Body) -> None:
        self.scope = scope
        self.body: Body | None = body
        # The streamed body to tell of a disconnect, once the response has one.
        self.told: Disconnectable | None = None

    def __call__(self, message: ASGIReceiveEvent) -> None:
        if message["type"] == "http.request":
            body = self.body
            if body is not None:
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
                    self.body = None
        elif message["type"] == "http.disconnect":
            self.scope.cancel()
            told, self.told = self.told, None
            if told is not None:
                try:
                    told.disconnected()
                except Exception:
                    # Its own exit (`__aexit__`) releases again, idempotently.
                    log.exception("a disconnected body failed to release")
