"""Per-frame write cost: N frames of 70 bytes through one SSE response, one at a time.

    python tests/bench/write_path.py [--frames 100000] [--repeat 3] [--body gen|channel]

Per variant (fast send off, then on) and repeat: a server process (Quart-Trio on
hypercorn's trio worker, pinned to CPU 0 with taskset where there is one) and a raw
socket client in this process (pinned to CPU 1) that sends one GET and reads until the
final chunk. The time is from the request to the last byte. ``--body gen`` yields
the frames from an async generator (what NOTES-style measurements used); ``channel``
sends them through a trio memory channel from another task, the shape of chatwatch's
hub -> watcher path. Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
FRAME = b"data: " + b"x" * 62 + b"\n\n"  # 70 bytes


def serve(port: int, frames: int, body: str, fast: bool) -> None:
    import hypercorn.config
    import hypercorn.trio
    import trio
    from quart import Response
    from quart_trio import QuartTrio

    sys.path.insert(0, str(ROOT))
    from app import fastsend

    if fast and not fastsend.install():
        raise SystemExit("fast send refused to install")
    app = QuartTrio(__name__)

    @app.get("/frames")
    async def frames_route() -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(frames):
                yield FRAME

        async def via_channel() -> AsyncIterator[bytes]:
            send, receive = trio.open_memory_channel[bytes](64)

            async def produce() -> None:
                async with send:
                    for _ in range(frames):
                        await send.send(FRAME)

            producers.start_soon(produce)
            async for item in receive:
                yield item

        source = gen() if body == "gen" else via_channel()
        response = Response(source, mimetype="text/event-stream")
        response.timeout = None
        return response

    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    producers: trio.Nursery

    async def main() -> None:
        nonlocal producers
        async with trio.open_nursery() as producers:
            await hypercorn.trio.serve(app, config)

    trio.run(main)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_once(frames: int, body: str, fast: bool) -> float:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(port), "--frames", str(frames)]
    cmd += ["--body", body, "--fast", "1" if fast else "0"]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        cmd = ["taskset", "-c", "0", *cmd]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with sock:
            started = time.perf_counter()
            sock.sendall(b"GET /frames HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            tail = b""
            got = 0
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                got += len(data)
                tail = (tail + data)[-16:]
                if tail.endswith(b"\r\n0\r\n\r\n"):
                    break
            took = time.perf_counter() - started
        if got < frames * len(FRAME):
            raise SystemExit(f"short response: {got} bytes")
        return took
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--body", choices=("gen", "channel"), default="gen")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fast", default="1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.frames, args.body, args.fast == "1")
        return
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    results: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeat):
        for variant in ("off", "on"):  # interleaved: drift on a shared machine hits both
            took = run_once(args.frames, args.body, variant == "on")
            results[variant].append(took)
            print(json.dumps({"fast_send": variant, "body": args.body, "seconds": took}))
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    n = args.frames
    print(
        f"body={args.body} frames={n}: off {off:.2f} s ({off / n * 1e6:.1f} us/frame), "
        f"on {on:.2f} s ({on / n * 1e6:.1f} us/frame), ratio {off / on:.2f}x"
    )


if __name__ == "__main__":
    main()
