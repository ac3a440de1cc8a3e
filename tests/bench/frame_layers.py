"""Where one delivered frame's time goes, layer by layer, in the `many` and `paced` shapes.

    python tests/bench/frame_layers.py [--shape many|paced|both] [--events 21]
        [--watchers 1000] [--repeat 3] [--no-profile]

The server side runs in this process, on CPU 0: the real nats-py protocol parser (fed
MSG bytes, as its read loop would be, with chatwatch's inline delivery), the real
`Hub`, `Outbox`, `WatchBody`, Quart-Trio's response loop, hypercorn's trio worker, h11
and the fast send adapter, over real TCP connections to a client process on CPU 1
that reads and discards. What is not here: the NATS socket itself and trio-asyncio's
hand-off of each read to nats-py's read loop (one per read of many messages, not one
per message; see `--bridge` below for its cost alone).

Each round publishes one event to every conversation (`many`: 1000 conversations x 1
watcher) or to the one conversation (`paced`: 1 x 1000 watchers), then waits until
every task is blocked, i.e. every frame is written: one write per frame, no
coalescing, the worst case per frame (the harness's `many` coalesces some).

Printed per shape: CPU us per delivered frame (median of `--repeat` runs, no
profiler), trio scheduler passes (task steps, counted by an Instrument: exact) per
frame, and a per-layer table: the profiler's own-time share of each layer (cProfile,
one extra run) times the unprofiled CPU per frame. cProfile inflates small functions,
so the split is an estimate; the totals and the pass counts are measurements. Then
microbenchmarks of single layers without a profiler (median us per call).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import selectors
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from app import fastchunk, fastsend, natsborder  # ruff: ignore[module-import-not-at-top-of-file]
from app.hub import Hub, MessageHandler  # ruff: ignore[module-import-not-at-top-of-file]
from app.outbox import Outbox  # ruff: ignore[module-import-not-at-top-of-file]
from app.watch import WatchBody  # ruff: ignore[module-import-not-at-top-of-file]

PAYLOAD = b'{"chunk_type":"text","text":"' + b"x" * 40 + b'"}'


def _cid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


# -- the NATS side: nats-py's parser with chatwatch's inline delivery -------------------


class ParserBus:
    """A `BusLike` whose subscriptions live in a real nats-py client's table, so that
    MSG bytes given to nats-py's parser reach the hub's handlers as in production."""

    def __init__(self) -> None:
        from nats.aio.client import Client
        from nats.protocol.parser import Parser

        self.connected = True
        self.nc: Any = Client()
        self.parser: Any = Parser(self.nc)
        self.sids: dict[str, int] = {}
        self._next_sid = 1

    def add_status_listener(self, listener: Callable[[bool], None]) -> None:
        pass

    async def wait_connected(self) -> None:
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def subscription(
        self, subject: str, handler: MessageHandler
    ) -> AsyncGenerator[Callable[[], None]]:
        from nats.aio.subscription import Subscription

        sid = self._next_sid
        self._next_sid += 1
        sub = Subscription(self.nc, sid, subject)
        natsborder.deliver_inline(sub, handler, lambda _s: None)
        self.nc._subs[sid] = sub
        self.sids[subject] = sid

        def release() -> None:
            self.nc._subs.pop(sid, None)

        try:
            await trio.lowlevel.checkpoint()
            yield release
        finally:
            release()

    def feed(self, data: bytes) -> None:
        """What nats-py's read loop does with one read: parse it, delivering inline.

        The parser's coroutine never suspends with inline delivery, so it is run to its
        end here with one `send`, on the trio thread, as trio-asyncio would run it.
        """
        coro: Coroutine[Any, Any, None] = self.parser.parse(data)
        try:
            coro.send(None)
        except StopIteration:
            return
        coro.close()
        raise RuntimeError("nats-py's parser suspended")


def msg_op(subject: str, sid: int, payload: bytes = PAYLOAD) -> bytes:
    return b"MSG %s %d %d\r\n%s\r\n" % (subject.encode(), sid, len(payload), payload)


# -- counting ----------------------------------------------------------------------------


class StepCounter(trio.abc.Instrument):
    """Counts task steps (one per trip of a task through trio's scheduler)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


# -- the server ----------------------------------------------------------------------------


def make_app(hub: Hub) -> Any:
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.get("/w/<cid>")
    async def watch(cid: str) -> Response:
        response = Response(WatchBody(hub, cid, None), content_type="text/event-stream")
        response.timeout = None
        return response

    return app


LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("nats-py parse + MSG dispatch", ("/nats/",)),
    ("natsborder inline delivery", ("app/natsborder.py",)),
    ("hub: parse_event + fan-out", ("app/hub.py", "app/events.py", "app/sse.py")),
    ("outbox offer/take", ("app/outbox.py",)),
    ("WatchBody.__anext__", ("app/watch.py",)),
    ("Quart-Trio body loop", ("/quart/", "/quart_trio/")),
    ("hypercorn HTTPStream/H11Protocol", ("/hypercorn/",)),
    ("h11 chunk framing", ("/h11/",)),
    ("fastsend (+ os.write syscall)", ("app/fastsend.py", "posix.write")),
    ("trio memory channel", ("trio/_channel.py",)),
    ("trio scheduler (run loop, epoll)", ("trio/_core", "epoll", "trio/_abc.py")),
]


def layer_of(filename: str, funcname: str) -> str:
    where = filename + " " + funcname
    for name, marks in LAYERS:
        if any(mark in where for mark in marks):
            return name
    return "other (bench driver, builtins, trio misc)"


@dataclass(frozen=True)
class Shape:
    name: str
    conversations: int
    watchers: int  # per conversation
    events: int


async def serve_and_measure(
    shape: Shape, profile: cProfile.Profile | None, counter: StepCounter, batch: int
) -> dict[str, float]:
    import hypercorn.config
    import hypercorn.trio

    bus = ParserBus()
    hub = Hub(bus, keepalive=3600.0)
    app = make_app(hub)
    config = hypercorn.config.Config()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.backlog = 4096
    total = shape.conversations * shape.watchers
    result: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await nursery.start(
            lambda task_status: hypercorn.trio.serve(app, config, task_status=task_status)
        )
        args = [str(port), str(shape.conversations), str(shape.watchers)]
        client = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--client", *args], stdout=subprocess.PIPE
        )
        try:
            assert client.stdout is not None
            with trio.fail_after(120):
                said = b""
                while b"ready" not in said:  # the client saw `:ok` on every stream
                    said += await client.stdout.receive_some()
                await trio.testing.wait_all_tasks_blocked()
            if sum(len(t.attached) for t in hub._topics.values()) != total:
                raise RuntimeError("not every watcher is attached")
            subjects = [f"chat.chunk.{_cid(c)}" for c in range(shape.conversations)]
            ops = [msg_op(s, bus.sids[f"chat.*.{_cid(c)}"]) for c, s in enumerate(subjects)]
            reads = [b"".join(ops[i : i + batch]) for i in range(0, len(ops), batch)]
            out0 = hub.events_out
            gc.collect()
            steps0 = counter.steps
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            for _ in range(shape.events):
                for read in reads:
                    bus.feed(read)
                    await trio.lowlevel.checkpoint()  # the read loop awaits its next read
                await trio.testing.wait_all_tasks_blocked()
            if profile is not None:
                profile.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            frames = hub.events_out - out0
            result = {
                "frames": frames,
                "cpu_us": cpu / frames * 1e6,
                "wall_us": wall / frames * 1e6,
                "steps": (counter.steps - steps0) / frames,
                "fast_writes": fastsend.stats.fast,
            }
        finally:
            client.kill()
            await client.wait()
            hub.close(b"")
            nursery.cancel_scope.cancel()
    return result


def run_shape(
    shape: Shape, batch: int, profile: cProfile.Profile | None, *, count: bool = False
) -> dict[str, float]:
    """One run; with `count`, an Instrument counts task steps (it costs a little CPU
    per step, so the timed runs go without it)."""
    counter = StepCounter()
    out: dict[str, float] = {}

    async def main() -> None:
        out.update(await serve_and_measure(shape, profile, counter, batch))

    trio.run(main, instruments=[counter] if count else [])
    return out


# -- the client ------------------------------------------------------------------------------


def client(port: int, conversations: int, watchers: int) -> None:
    """Open every watch, then read and discard until killed."""
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    sel = selectors.DefaultSelector()
    socks = []
    for c in range(conversations):
        for _ in range(watchers):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"GET /w/{_cid(c)} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
    waiting = set(socks)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data = sock.recv(1 << 16)
            if not data:
                sel.unregister(sock)
            elif waiting and b":ok" in data:
                waiting.discard(sock)
                if not waiting:
                    sys.stdout.write("ready\n")
                    sys.stdout.flush()


# -- single-layer microbenchmarks ----------------------------------------------------------


def _median_us(fn: Callable[[], int], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def micro(repeat: int) -> dict[str, float]:
    import h11

    results: dict[str, float] = {}
    n = 20000

    # nats-py: parse MSG ops and dispatch each to a handler that does nothing.
    async def nats_parse() -> None:
        bus = ParserBus()
        async with bus.subscription("chat.*.x", lambda _s, _p, _h: None):
            sid = bus.sids["chat.*.x"]
            buf = msg_op("chat.chunk.x", sid) * 100

            def go() -> int:
                for _ in range(n // 100):
                    bus.feed(buf)
                return n

            results["nats-py parse + inline delivery (per msg, 100 msgs a read)"] = _median_us(
                go, repeat
            )

    trio.run(nats_parse)

    # The hub's handler for one message and one watcher: parse_event, fan-out, offer.
    async def hub_deliver() -> None:
        from app.events import parse_event

        bus = ParserBus()
        hub = Hub(bus, keepalive=3600.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            w = hub.join(_cid(0), None)
            await hub.admit(w)
            topic = w.topic

            def go() -> int:
                for _ in range(n):
                    hub._deliver(topic, f"chat.chunk.{_cid(0)}", PAYLOAD, None)
                    w.outbox.receive_nowait()
                return n

            results["hub._deliver: parse_event + fan-out + offer (1 watcher)"] = _median_us(
                go, repeat
            )

            def parse() -> int:
                for _ in range(n):
                    parse_event("chunk", PAYLOAD, 1 << 20)
                return n

            results["  of which events.parse_event"] = _median_us(parse, repeat)
            hub.leave(w)
            nursery.cancel_scope.cancel()

    trio.run(hub_deliver)

    # A parked task woken by a channel send and run once: the pass a frame costs.
    async def wake() -> None:
        box = Outbox(8192, 1 << 24)
        done = trio.Event()
        got = 0

        async def reader() -> None:
            nonlocal got
            while True:
                await box.take(1 << 18)
                got += 1
                if got == n:
                    done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            times = []
            for _ in range(repeat):
                got = 0
                done = trio.Event()
                t0 = time.perf_counter()
                for _ in range(n):
                    box.offer(b"x")
                    await trio.testing.wait_all_tasks_blocked()
                await done.wait()
                times.append((time.perf_counter() - t0) / n * 1e6)
            results["offer + wake + take, one parked reader (incl. 2 passes)"] = statistics.median(
                times
            )
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(n):
                    await trio.lowlevel.checkpoint()
                times.append((time.perf_counter() - t0) / n * 1e6)
            results["trio checkpoint (one scheduler pass, one task)"] = statistics.median(times)
            nursery.cancel_scope.cancel()

    trio.run(wake)

    # The NATS socket's side of the bridge: one read reaching a reader and waking a trio
    # task, through trio-asyncio (nats-py's read loop is an asyncio StreamReader) and,
    # for comparison, a trio socket read. The difference is what trio-asyncio costs per
    # read (nats-py reads up to 32 KiB at once: one read carries many messages).
    async def bridge(kind: str) -> None:
        import asyncio

        import trio_asyncio

        a, b = socket.socketpair()
        a.setblocking(False)
        arrived = [trio.Event()]

        def on_data(_data: bytes) -> None:
            arrived[0].set()

        async def aio_reader() -> None:
            reader, _writer = await asyncio.open_connection(sock=a)
            while data := await reader.read(65536):
                on_data(data)

        async def trio_reader() -> None:
            sock = trio.socket.from_stdlib_socket(a)
            while data := await sock.recv(65536):
                on_data(data)

        async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
            if kind == "trio-asyncio":
                nursery.start_soon(trio_asyncio.aio_as_trio(aio_reader, loop=loop))
            else:
                nursery.start_soon(trio_reader)
            await trio.testing.wait_all_tasks_blocked()
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(n // 4):
                    arrived[0] = trio.Event()
                    b.send(b"x")
                    await arrived[0].wait()
                times.append((time.perf_counter() - t0) / (n // 4) * 1e6)
            label = f"one socket read to a trio wake-up, via {kind}"
            results[label] = statistics.median(times)
            nursery.cancel_scope.cancel()
        b.close()

    trio.run(bridge, "trio-asyncio")
    trio.run(bridge, "a trio socket")

    # h11's chunked framing of one 80-byte body chunk.
    conn = h11.Connection(our_role=h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
    frame = b"data: " + b"x" * 72 + b"\n\n"

    def framing() -> int:
        for _ in range(n):
            conn.send(h11.Data(data=frame))
        return n

    results["h11 Connection.send(Data) (chunk framing)"] = _median_us(framing, repeat)

    a, b = socket.socketpair()
    a.setblocking(False)

    def write() -> int:
        fd = a.fileno()
        for i in range(n):
            os.write(fd, frame)
            if i % 16 == 15:
                while True:
                    try:
                        b.recv(1 << 20, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
        return n

    results["os.write of one frame to a socket (syscall)"] = _median_us(write, repeat)
    a.close()
    b.close()
    return results


def set_fast_chunk(variant: str) -> None:
    if variant == "off":
        fastchunk.uninstall()
    elif not fastchunk.install():
        raise SystemExit("fast chunk refused to install")


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("many", "paced", "both"), default="both")
    parser.add_argument("--events", type=int, default=21)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="MSG ops per parser read")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument("--top", type=int, default=0, help="print the profile's top N")
    parser.add_argument("--fast-send", choices=("on", "off"), default="on")
    parser.add_argument("--fast-chunk", choices=("on", "off", "both"), default="on")
    parser.add_argument("--client", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(*args.client)
        return
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    if args.fast_send == "on" and not fastsend.install():
        raise SystemExit("fast send refused to install")
    chunk_variants = ["off", "on"] if args.fast_chunk == "both" else [args.fast_chunk]
    shapes = []
    if args.shape in ("many", "both"):
        shapes.append(Shape("many", args.watchers, 1, args.events))
    if args.shape in ("paced", "both"):
        shapes.append(Shape("paced", 1, args.watchers, args.events))
    for shape in shapes:
        by_variant: dict[str, list[dict[str, float]]] = {v: [] for v in chunk_variants}
        for _ in range(args.repeat):
            for variant in chunk_variants:  # interleaved: drift hits every variant
                set_fast_chunk(variant)
                by_variant[variant].append(run_shape(shape, args.batch, None))
        if len(chunk_variants) > 1:
            for variant, vruns in by_variant.items():
                each = ", ".join(f"{r['cpu_us']:.1f}" for r in vruns)
                print(f"{shape.name} fast chunk {variant}: CPU us/frame {each}")
        runs = by_variant[chunk_variants[-1]]
        cpu = statistics.median(r["cpu_us"] for r in runs)
        steps = run_shape(shape, args.batch, None, count=True)["steps"]
        wall = statistics.median(r["wall_us"] for r in runs)
        print(
            f"\n== {shape.name}: {shape.conversations} conversations x {shape.watchers} "
            f"watchers x {shape.events} events, {int(runs[0]['frames'])} frames a run"
        )
        each = ", ".join(f"{r['cpu_us']:.1f}" for r in runs)
        print(f"CPU {cpu:.1f} us/frame (runs: {each})")
        print(f"wall {wall:.1f} us/frame; trio task steps {steps:.2f}/frame")
        if args.no_profile:
            continue
        profile = cProfile.Profile()
        run_shape(shape, args.batch, profile)
        stats = pstats.Stats(profile)
        by_layer: dict[str, float] = {}
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        for (filename, _line, funcname), (_cc, _nc, tottime, _ct, callers) in raw.items():
            if filename == "~" and funcname != "<built-in method posix.write>" and callers:
                # A builtin (len, getattr, str.encode...): its time goes to the layers
                # that called it, in proportion.
                for (cfile, _cline, cfunc), caller_stats in callers.items():
                    layer = layer_of(cfile, cfunc)
                    by_layer[layer] = by_layer.get(layer, 0.0) + caller_stats[2]
                continue
            layer = layer_of(filename, funcname)
            by_layer[layer] = by_layer.get(layer, 0.0) + tottime
        whole = sum(by_layer.values())
        if args.top:
            stats.sort_stats("tottime").print_stats(args.top)
        print(f"{'layer':44s} {'share':>6s} {'us/frame':>9s}")
        for name in [n for n, _ in LAYERS] + ["other (bench driver, builtins, trio misc)"]:
            share = by_layer.get(name, 0.0) / whole
            print(f"{name:44s} {share * 100:5.1f}% {share * cpu:9.2f}")
    if not args.no_micro:
        print("\n== single layers, no profiler (median us per call)")
        for name, us in micro(max(args.repeat, 3)).items():
            print(f"{name:60s} {us:7.2f}")


if __name__ == "__main__":
    main()
