"""The composition root: one function owns every long-lived thing, in nested scopes.

    run
     +-- embedded nats-server (when no --nats-url)      outermost: stops last
         +-- store                                       connections closed on exit
             +-- bus: trio-asyncio loop + NATS connection drained on exit
                 +-- hub: one task per watched conversation, keepalives
                     +-- hypercorn serve() + signal handling, and the task that
                         ends the streams of revoked or expired sessions

Shutdown (SIGTERM/SIGINT, or the `shutdown` event): every stream gets a ``retry:``
frame and ends, hypercorn closes the connections and returns, then each scope above
unwinds in turn. A second signal exits at once.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import hypercorn.config
import hypercorn.trio
import trio

from app import embedded, fastchunk, fastsend, idletask, inbox, readloop, sse
from app.bus import Bus, open_bus
from app.config import Settings
from app.errors import BusUnavailable, unwrap_single
from app.history import HistoryConfig, open_history
from app.http import CloseSafeASGI, Demo, create_app
from app.hub import Hub, open_hub
from app.listen import make_listener
from app.metrics import publish_snapshots
from app.revocation import end_revoked_sessions
from app.store import check_database, open_store

log = logging.getLogger("chatwatch")

# What a client is told at shutdown: reconnect (to another instance) after 1 s.
SHUTDOWN_FRAME = sse.retry_frame(1000) + sse.comment("server shutting down; reconnect")

Extra = Callable[[Bus], Awaitable[None]]


def hypercorn_config(settings: Settings, listener: socket.socket) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    # Our own socket (see listen.py); hypercorn adopts the descriptor and closes it.
    config.bind = [f"fd://{listener.detach()}"]
    config.graceful_timeout = settings.shutdown_grace
    config.backlog = 4096
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.h11_max_incomplete_size = 16 * 1024
    # No "server: hypercorn-h11" on every response: it tells a client nothing it needs
    # (and an attacker the server's make), and is one header fewer to build and check.
    config.include_server_header = False
    return config


async def collect_garbage(min_interval: float = 10.0, budget: float = 0.01) -> None:
    """Full garbage collections on a schedule, at most `budget` of the CPU.

    Every cancelled stream leaves reference cycles (a Cancelled and the exception
    group around it, whose tracebacks hold quart, hypercorn and trio frames); only a
    full collection frees them, and CPython's own schedule runs one rarely (measured:
    RSS +1.3 MiB per 5000 aborted streams, still growing after 40000; flat with
    regular full collections). The pause blocks the loop for as long as the
    collection takes, so the next one waits at least 1/`budget` times that long.
    """
    interval = min_interval
    while True:
        await trio.sleep(interval)
        started = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - started
        interval = max(min_interval, took / budget)


async def _decide_history(bus: Bus, hub: Hub, settings: Settings) -> None:
    """Find or create the history stream once NATS is there; tell the hub.

    A stream that exists but does not fit raises HistoryError: the service stops with
    that one line rather than serve streams that cannot keep their promise.
    """
    config = HistoryConfig(
        stream=settings.history_stream,
        max_age=settings.history_max_age,
        max_per_conversation=settings.history_max_per_conversation,
        replicas=settings.history_replicas,
        replay_cap=settings.replay_cap,
    )
    delay = 0.1
    while True:
        await bus.wait_connected()
        try:
            history = await open_history(bus, config, settings.history)
        except BusUnavailable as exc:
            log.info("history: waiting for NATS (%s)", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        hub.set_history(history)
        return


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if stop.is_set():
                log.warning("second signal (%s): exiting now", signal.Signals(signum).name)
                embedded.kill_children()
                os._exit(1)
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop.set()


async def run(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    demo: Demo | None = None,
    extra: Extra | None = None,
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set or a signal arrives; return when all is closed.

    `task_status.started` gets hypercorn's bound URLs. `extra(bus)`,
    if given, runs in the server's nursery (the demo's simulated AI run) and is
    cancelled at shutdown. `listener`, if given, is the bound socket to serve on (the
    command line binds it before anything starts); else one is bound here.
    """
    stop = shutdown if shutdown is not None else trio.Event()
    if settings.fast_send == "on":
        fastsend.install()
        fastchunk.install()
    else:
        fastsend.uninstall()
        fastchunk.uninstall()
    # Each connection's keep-alive timer without a lock or a start handshake.
    idletask.install()
    # Each request's ASGI messages without a memory channel or a reading task.
    inbox.install()
    # Each connection's read loop with no timeout scope or trio socket frames held.
    readloop.install()
    # Before anything starts (the embedded nats-server): a database that can never be
    # opened is a usage error, not an outage.
    await trio.to_thread.run_sync(check_database, settings.database_url)
    try:
        async with AsyncExitStack() as stack:
            outer = await stack.enter_async_context(trio.open_nursery())
            # Cancelled when everything inside has closed: the embedded server and the
            # signal watcher live until the very end (a second signal must work even
            # while a stalled client holds hypercorn's uncancellable write).
            stack.callback(outer.cancel_scope.cancel)
            if handle_signals:
                outer.start_soon(_watch_signals, stop)
            if settings.nats_urls:
                nats_urls = list(settings.nats_urls)
            else:
                server = await outer.start(embedded.serve_nats, settings.nats_data_dir)
                nats_urls = [server.url]
            store = await stack.enter_async_context(open_store(settings.database_url))
            bus = await stack.enter_async_context(open_bus(nats_urls))
            hub = await stack.enter_async_context(
                open_hub(
                    bus,
                    buffer=settings.watcher_buffer,
                    buffer_bytes=settings.watcher_buffer_bytes,
                    max_payload=settings.max_payload,
                    keepalive=settings.keepalive,
                    replay_cap=settings.replay_cap,
                    await_history=True,
                    write_window=settings.write_window / 1000,
                )
            )

            app = create_app(
                hub=hub,
                store=store,
                is_nats_connected=lambda: bus.connected,
                max_watchers=settings.max_watchers,
                max_watchers_per_session=settings.max_watchers_per_session,
                demo=demo,
                metrics_dir=settings.metrics_dir,
                worker=settings.worker,
            )

            async def shutdown_trigger() -> None:
                await stop.wait()
                hub.close(SHUTDOWN_FRAME)

            serve_done = trio.Event()

            async def serve_app(*, task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    host, port = settings.host_port
                    sock = listener or make_listener(
                        host, port, write_timeout=settings.write_timeout
                    )
                    await hypercorn.trio.serve(
                        CloseSafeASGI(app),
                        hypercorn_config(settings, sock),
                        shutdown_trigger=shutdown_trigger,
                        task_status=task_status,
                    )
                finally:
                    serve_done.set()

            async with trio.open_nursery() as server_nursery:
                server_nursery.start_soon(collect_garbage)
                if settings.metrics_dir is not None:
                    server_nursery.start_soon(
                        publish_snapshots,
                        hub,
                        lambda: bus.connected,
                        settings.metrics_dir,
                        settings.worker,
                    )
                # Decided at the first connection (it depends on the servers); topics
                # wait for it before they subscribe.
                server_nursery.start_soon(_decide_history, bus, hub, settings)
                server_nursery.start_soon(end_revoked_sessions, store, hub)
                binds = await server_nursery.start(serve_app)
                log.info("serving on %s", ", ".join(binds))
                if extra is not None:
                    server_nursery.start_soon(extra, bus)
                task_status.started(binds)
                await stop.wait()
                # hypercorn returns once its connections are closed (or after the grace
                # period); then the rest of this nursery goes.
                with trio.move_on_after(settings.shutdown_grace):
                    await serve_done.wait()
                server_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise unwrap_single(group) from None
    log.info("stopped")
