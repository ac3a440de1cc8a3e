"""Run `serve` or `demo` in this process, or `serve` in N processes on one port.

With ``--workers N`` the parent starts the embedded nats-server (if no URL was given)
and N children, each a full `chatwatch serve --workers 1` with its own NATS
connection and hub, all bound to the same port with SO_REUSEPORT: the kernel spreads
connections across them. The parent forwards SIGTERM/SIGINT and exits 0 when every
child did.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from functools import partial
from typing import NoReturn

import trio

from app import embedded
from app.bus import ConnectionClosedForGood
from app.config import Settings
from app.errors import unwrap_single

log = logging.getLogger("chatwatch.workers")


def tune_gc() -> None:
    """Fewer, larger garbage collections.

    Every cancelled stream leaves reference cycles (exceptions and their tracebacks),
    and with thousands of live connections each full collection walks them all: with
    CPython's default thresholds, closing 5000 streams at once spent most of its time
    in the collector (measured, see README "Performance"). Objects alive at startup
    are frozen out of the collector's sight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _exit_now(code: int) -> NoReturn:
    """Exit without interpreter finalization, once `run` has closed everything.

    Every stream, socket, subscription and child is closed by then (structured
    concurrency saw to it); what finalization would still do is walk thousands of dead
    connection objects, a quarter of a second with 5000 streams, while a deploy waits.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(command: str, settings: Settings) -> int:
    tune_gc()
    try:
        if command == "demo":
            from app.demo import run_demo

            trio.run(run_demo, settings)
            return 0
        if settings.workers == 1:
            from app.service import run

            trio.run(run, settings)
            _exit_now(0)
        return trio.run(_supervise, settings)
    except KeyboardInterrupt:
        return 130
    except ConnectionClosedForGood as exc:
        # Serving streams that can never receive anything again would be worse than
        # exiting: a supervisor restarts us, and the operator sees why.
        log.critical("%s; exiting", exc)
        return 3


def _child_args(settings: Settings, nats_url: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--workers",
        "1",
        "--reuse-port",
        "--bind",
        settings.bind,
        "--nats-url",
        nats_url,
        "--keepalive",
        str(settings.keepalive),
        "--watcher-buffer",
        str(settings.watcher_buffer),
        "--watcher-buffer-bytes",
        str(settings.watcher_buffer_bytes),
        "--max-payload",
        str(settings.max_payload),
        "--max-watchers",
        str(settings.max_watchers),
        "--max-watchers-per-session",
        str(settings.max_watchers_per_session),
        "--shutdown-grace",
        str(settings.shutdown_grace),
        "--log-level",
        settings.log_level,
        "--write-timeout",
        str(settings.write_timeout),
    ]
    if settings.database_url:
        args += ["--database-url", settings.database_url]
    return args


async def _supervise(settings: Settings) -> int:
    """Run the workers; on a signal, forward it once to each; if one worker exits on
    its own, stop the others too, so that the supervisor above us sees the failure
    and restarts the whole service rather than running with less capacity."""
    codes: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            if settings.nats_urls:
                nats_url = ",".join(settings.nats_urls)
            else:
                server = await nursery.start(embedded.serve_nats, settings.nats_data_dir)
                nats_url = server.url
            env = {k: v for k, v in os.environ.items() if not k.startswith("CHATWATCH_")}
            procs: list[trio.Process] = []
            async with trio.open_nursery() as children:
                for _ in range(settings.workers):
                    # Own session: a terminal's Ctrl-C or a group-wide SIGTERM reaches
                    # only us, and each worker gets exactly one signal, from us.
                    proc = await children.start(
                        partial(
                            trio.run_process,
                            _child_args(settings, nats_url),
                            check=False,
                            env=env,
                            start_new_session=True,
                        )
                    )
                    procs.append(proc)
                log.info("%d workers on %s", len(procs), settings.bind)
                stopping = trio.Event()

                def stop_all(signum: int) -> None:
                    stopping.set()
                    for p in procs:
                        if p.returncode is None:
                            p.send_signal(signum)

                async def forward_signals() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            if stopping.is_set():
                                embedded.kill_children()
                                for p in procs:
                                    if p.returncode is None:
                                        p.kill()
                            stop_all(signum)

                async def watch(p: trio.Process) -> None:
                    code = await p.wait()
                    codes.append(code)
                    if not stopping.is_set():
                        log.error("worker %d exited with %d; stopping the others", p.pid, code)
                        stop_all(signal.SIGTERM)

                children.start_soon(forward_signals)
                async with trio.open_nursery() as watchers:
                    for p in procs:
                        watchers.start_soon(watch, p)
                children.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise unwrap_single(group) from None
    # 0 only if every worker shut down cleanly.
    return max((abs(c) for c in codes), default=0)
