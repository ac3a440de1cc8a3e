"""Run `serve` or `demo` in this process, or `serve` in N processes on one port.

With ``--workers N`` the parent, which has bound the one listening socket (cli.py),
starts the embedded nats-server (if no URL was given) and N children
(``python -m app.workers``), each a full service with its own NATS connection and
hub, accepting on the inherited socket: the kernel hands each connection to one of
them. A child gets the parent's `Settings` object whole, as JSON on its stdin (not
in an argv, which every local user can read, nor copied by hand flag by flag), with
the socket's descriptor and its worker number, which its log lines carry. The parent
forwards SIGTERM/SIGINT and exits 0 when every child did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import sys
import tempfile
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

    The middle generation is collected only after 100 young collections (CPython's
    default: 10; ours was 20). Each of its collections walks every object that
    survived a young one, about 1 us apiece with thousands of connections: during a
    burst of connects that is every new connection's state, all of it alive, so the
    walk frees nothing (measured with tests/bench/connect_profile.py: 5000 connects
    took one such collection, about 150 us of CPU per connect, 10 to 15 % of a
    connect). `service.collect_garbage`'s scheduled full collections (every 10 s or
    more) reset the count, so in practice the middle generation is left to them;
    the threshold is what remains if the allocation rate is extreme (5 million
    objects between two scheduled collections).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 100, 10)


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


def main(command: str, settings: Settings, listener: socket.socket) -> int:
    """Serve on `listener` (bound by the caller) until a signal; return the exit code."""
    try:
        if command == "demo":
            from app.demo import run_demo

            tune_gc()  # after the last import: Quart, hypercorn, jinja2 are frozen too
            trio.run(partial(run_demo, settings, listener=listener))
            return 0
        from app.service import run

        tune_gc()
        if settings.workers == 1:
            trio.run(partial(run, settings, listener=listener))
            _exit_now(0)
        return trio.run(_supervise, settings, listener)
    except KeyboardInterrupt:
        return 130
    except ConnectionClosedForGood as exc:
        # Serving streams that can never receive anything again would be worse than
        # exiting: a supervisor restarts us, and the operator sees why.
        log.critical("%s; exiting", exc)
        return 3


def _child_args() -> list[str]:
    return [sys.executable, "-m", "app.workers"]


def _child_input(
    settings: Settings, nats_url: str, fd: int, worker: int, metrics_dir: str
) -> bytes:
    child = dataclasses.replace(
        settings, nats_urls=(nats_url,), workers=1, metrics_dir=metrics_dir, worker=worker
    )
    return json.dumps({"settings": child.to_json(), "fd": fd, "worker": worker}).encode()


def child_main() -> int:
    """A worker: read what the parent sent on stdin, serve on the inherited socket."""
    from app.errors import ChatwatchError
    from app.service import run

    boot = json.loads(sys.stdin.buffer.read())
    settings = Settings.from_json(boot["settings"])
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker {boot['worker']} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    listener = socket.socket(fileno=boot["fd"])
    tune_gc()
    try:
        trio.run(partial(run, settings, listener=listener))
    except KeyboardInterrupt:
        return 130
    except ConnectionClosedForGood as exc:
        log.critical("%s; exiting", exc)
        return 3
    except ChatwatchError as exc:
        print(f"chatwatch: worker {boot['worker']}: {exc}", file=sys.stderr)
        return 1
    _exit_now(0)


async def _supervise(settings: Settings, listener: socket.socket) -> int:
    """Run the workers; on a signal, forward it once to each; if one worker exits on
    its own, stop the others too, so that the supervisor above us sees the failure
    and restarts the whole service rather than running with less capacity."""
    codes: list[int] = []
    try:
        with contextlib.ExitStack() as stack:
            await _run_workers(settings, listener, codes, stack)
    except BaseExceptionGroup as group:
        raise unwrap_single(group) from None
    finally:
        listener.close()
    # 0 only if every worker shut down cleanly.
    return max((abs(c) for c in codes), default=0)


async def _run_workers(
    settings: Settings, listener: socket.socket, codes: list[int], stack: contextlib.ExitStack
) -> None:
    async with trio.open_nursery() as nursery:
        if settings.nats_urls:
            nats_url = ",".join(settings.nats_urls)
        else:
            server = await nursery.start(embedded.serve_nats, settings.nats_data_dir)
            nats_url = server.url
        # The settings travel whole on stdin; the environment must not add to them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATWATCH_")}
        procs: list[trio.Process] = []
        # Each worker writes its numbers here; any worker's /metrics sums them.
        metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatwatch-"))
        async with trio.open_nursery() as children:
            fd = listener.fileno()
            for worker in range(1, settings.workers + 1):
                # Own session: a terminal's Ctrl-C or a group-wide SIGTERM reaches
                # only us, and each worker gets exactly one signal, from us.
                proc = await children.start(
                    partial(
                        trio.run_process,
                        _child_args(),
                        stdin=_child_input(settings, nats_url, fd, worker, metrics_dir),
                        pass_fds=(fd,),
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


if __name__ == "__main__":
    sys.exit(child_main())
