"""The Quart-Trio application: the watch endpoint, health, metrics, docs, viewer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import trio
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from app import asgiconn, auth, ids, limits, metrics, openapi
from app.errors import StoreUnavailable
from app.hub import Hub, Resume
from app.store import Access, Store
from app.watch import WatchBody

log = logging.getLogger("chatwatch.http")

JSON = "application/json"
# Constant bodies: a 404 for a missing conversation and for another user's one are
# byte-identical (no existence oracle).
UNAUTHORIZED = b'{"error": "unauthorized"}'
NOT_FOUND = b'{"error": "not_found"}'
UNAVAILABLE = b'{"error": "unavailable"}'
TOO_MANY = b'{"error": "too_many_watchers"}'
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    # An SSE response is never followed by another request on its connection; saying
    # so lets the server close the socket as soon as the stream ends (shutdown).
    "Connection": "close",
}


@dataclass(frozen=True, slots=True)
class Demo:
    """Set by `chatwatch demo`: the viewer page logs the browser in as this session."""

    token: str
    conversation_id: str


def _json(body: bytes, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status, content_type=JSON, headers=headers)


def create_app(
    *,
    metrics_dir: str | None = None,
    worker: int = 0,
    hub: Hub,
    store: Store,
    is_nats_connected: Any,
    max_watchers: int,
    max_watchers_per_session: int,
    demo: Demo | None = None,
) -> QuartTrio:
    """Build the app. Owns no task: every long-lived thing belongs to `service.run`."""
    app = QuartTrio("chatwatch")
    if asgiconn.is_supported():
        # A long stream holds no request, response or second task (app/asgiconn.py).
        app.asgi_http_class = asgiconn.LeanHTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    # No 308 redirects for "//" in a path (a percent-encoded "/" in an id would get
    # one): an id that is not a UUID is a 404, however it is spelled.
    app.url_map.merge_slashes = False
    registry = metrics.make_registry(hub, is_nats_connected, metrics_dir, worker)
    admission = limits.Admission(max_watchers, max_watchers_per_session)
    app.asgi_app = _ReleaseSlots(app.asgi_app)  # type: ignore[method-assign]
    viewer = resources.files("app").joinpath("static/viewer.html").read_text("utf-8")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        if exc.code == 404:
            return _json(NOT_FOUND, 404)
        name = (exc.name or "error").lower().replace(" ", "_")
        headers = None
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers = {"Allow": ", ".join(sorted(exc.valid_methods))}
        return _json(json.dumps({"error": name}).encode(), exc.code or 500, headers)

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _json(b'{"error": "internal"}', 500)

    @app.get("/api/ai/conversations/<raw_id>/watch")
    async def watch(raw_id: str) -> Response:
        token = auth.token_from_headers(
            request.headers.get("Authorization"), request.cookies.get(auth.COOKIE_NAME)
        )
        if token is None:
            return _json(UNAUTHORIZED, 401)
        conversation_id = ids.parse_conversation_id(raw_id)
        try:
            grant = await store.authorize(token, conversation_id)
        except StoreUnavailable as exc:
            log.warning("session store unavailable: %s", exc)
            return _json(UNAVAILABLE, 503, {"Retry-After": "5"})
        if grant.access is Access.UNAUTHORIZED:
            return _json(UNAUTHORIZED, 401)
        if grant.access is not Access.GRANTED or conversation_id is None:
            return _json(NOT_FOUND, 404)
        if hub.closed:
            return _json(UNAVAILABLE, 503, {"Retry-After": "1"})
        owner = grant.token_hash
        # Checked and taken in one step, and held by the request until it ends.
        slot = admission.try_reserve(owner)
        if slot is None:
            return _json(TOO_MANY, 429, {"Retry-After": "5"})
        limits.hold_for_request(cast(dict[str, Any], request.scope), slot)
        response = Response(
            WatchBody(hub, conversation_id, owner, _resume_request(), slot),
            status=200,
            content_type="text/event-stream",
            headers=SSE_HEADERS,
        )
        # Quart's RESPONSE_TIMEOUT (60 s) would cut every stream; only this one opts out.
        response.timeout = None
        return response

    def _resume_request() -> Resume:
        # The header (what EventSource sends by itself on a reconnect) wins over the
        # query parameter (for clients that cannot set headers).
        last = request.headers.get("Last-Event-ID")
        if not request.query_string:
            # Most watch requests have no query: its parse (a MultiDict) is skipped.
            return Resume(last_event_id=last.strip() if last is not None else None)
        if last is None:
            last = request.args.get("last_event_id")
        live_only = request.args.get("live_only", "").lower() in ("1", "true", "yes")
        return Resume(last_event_id=last.strip() if last is not None else None, live_only=live_only)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(b'{"status": "ok"}', 200)

    @app.get("/readyz")
    async def readyz() -> Response:
        nats_ok = bool(is_nats_connected())
        store_ok = await store.ping()
        history = hub.history is not None
        body = json.dumps({"nats": nats_ok, "store": store_ok, "history": history}).encode()
        return _json(body, 200 if nats_ok and store_ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render(registry)
        return Response(body, status=200, content_type=content_type)

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return _json(openapi.DOCUMENT, 200)

    @app.get("/")
    async def index() -> Response:
        page = viewer.replace("{{conversation_id}}", demo.conversation_id if demo else "")
        response = Response(page, status=200, content_type="text/html; charset=utf-8")
        if demo is not None:
            response.set_cookie(
                auth.COOKIE_NAME, demo.token, httponly=True, samesite="Strict", path="/"
            )
        return response

    return app


class _ReleaseSlots:
    """ASGI middleware: a request's admission slot is released when the request ends.

    The response body releases it as soon as it ends; this catches the request whose
    body never ran (the client left while the head was being sent, which cancels
    the request before Quart enters the body).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            limits.release_request_slot(scope)


class CloseSafeASGI:
    """Wraps the Quart-Trio app so that a response's last send is never cancelled.

    Found by experiment: when a response ends on a connection that must close
    (``Connection: close``, HTTP/1.0, every SSE stream), hypercorn delivers
    ``http.disconnect`` to the app from *inside* the app's final ``send``; quart-trio
    reacts by cancelling the request nursery, which cancels that very ``send``
    before hypercorn has closed the socket. The client then waits for EOF until
    hypercorn's keep-alive timeout. Shielding the final send lets the close finish.
    """

    def __init__(self, app: QuartTrio) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        asgi_app = self.app.asgi_app
        if (
            self.app.asgi_http_class is asgiconn.LeanHTTPConnection
            and type(asgi_app) is _ReleaseSlots
            and getattr(asgi_app.app, "__func__", None) is Quart.asgi_app
        ):
            # What `_ReleaseSlots` and Quart's `asgi_app` would do, without their two
            # frames suspended for the whole stream: make the request handler and
            # call it (asgiconn.py mirrors `asgi_app` too), release the slot after.
            # `LeanHTTPConnection` shields its final send itself.
            try:
                await asgiconn.LeanHTTPConnection(self.app, scope)(receive, send)
            finally:
                limits.release_request_slot(scope)
            return

        async def send_final_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        # `asgi_app`, not the app: Quart's `__call__` only calls it, and would be one
        # more suspended frame for the whole stream.
        await self.app.asgi_app(scope, receive, send_final_shielded)
