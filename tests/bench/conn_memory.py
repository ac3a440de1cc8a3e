#!/usr/bin/env python3
"""What one idle SSE watcher holds: bytes by layer, allocation sites, objects, tasks, RSS.

    .venv/bin/python tests/bench/conn_memory.py [--watchers 1000] [--conversations 200]
        [--no-trace] [--frames 25] [--top 15] [--json OUT]

Serves chatwatch in this process (`app.service.run`, as `chatwatch serve` does, against
a nats-server child without JetStream, history off, a seeded SQLite store), then a
client child process opens `--watchers` real sockets, sends the harness's request
head and reads each stream up to `:ok`. Measured before (after a warm-up batch has
come and gone, so first-use caches are in the baseline) and after, with a full
garbage collection before each:

- tracemalloc (`--frames` deep): bytes per watcher by layer, once by the innermost
  library frame ("allocated in") and once skipping trio as well ("on behalf of": a
  task trio allocates for hypercorn counts as hypercorn's), and the top sites;
- `gc.get_objects()`: container objects per watcher by type;
- trio tasks per watcher, by name;
- VmRSS per watcher. With tracing on, RSS includes tracemalloc's own bookkeeping:
  `--no-trace` gives the figure to compare with the harness's idle scenario.

The client is a separate process so that its sockets and buffers are not counted.
Every figure is a difference divided by the number of watchers, so fixed costs
(one subscription per conversation, the hub's tasks) are spread over them.
"""

from __future__ import annotations

import argparse
import gc
import json
import selectors
import socket
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Layers, matched in this order against a frame's file name.
LAYERS: list[tuple[str, str]] = [
    ("/hypercorn/", "hypercorn"),
    ("/h11/", "h11"),
    ("/quart_trio/", "quart"),
    ("/quart/", "quart"),
    ("/werkzeug/", "werkzeug"),
    ("/trio_asyncio/", "trio_asyncio/nats"),
    ("/nats/", "trio_asyncio/nats"),
    ("/trio/", "trio"),
    (str(ROOT / "app") + "/", "app"),
]
LAYER_ORDER = ["hypercorn", "h11", "quart", "werkzeug", "trio", "trio_asyncio/nats", "app", "other"]
OK = b":ok\n\n"
CLIENT_DEADLINE = 300.0
STARTED = time.monotonic()


def layer_of(filename: str) -> str | None:
    for marker, layer in LAYERS:
        if marker in filename:
            return layer
    return None


def attribute(frames: Iterable[tracemalloc.Frame], skip: frozenset[str]) -> str:
    """The layer of the innermost frame that belongs to a layer not in `skip`
    (standard library frames belong to none: their caller decides)."""
    for frame in frames:
        layer = layer_of(frame.filename)
        if layer is not None and layer not in skip:
            return layer
    return "other"


def short(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3."):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{frame.lineno}"


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def object_counts() -> Counter[str]:
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def trio_tasks() -> list[trio.lowlevel.Task]:
    tasks: list[trio.lowlevel.Task] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        tasks.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return tasks


def task_names() -> Counter[str]:
    names: Counter[str] = Counter()
    for task in trio_tasks():
        # "topic <uuid>" and the like: one name per kind.
        names[task.name.split(" ")[0]] += 1
    return names


@dataclass
class Point:
    rss_kb: int
    objects: Counter[str]
    tasks: Counter[str]
    snapshot: tracemalloc.Snapshot | None = None


def progress(what: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f} s] {what}", file=sys.stderr, flush=True)


def take(trace: bool) -> Point:
    objects = object_counts()
    tasks = task_names()
    gc.collect()
    snapshot = None
    if trace:
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
    return Point(rss_kb(), objects, tasks, snapshot)


@dataclass
class Report:
    watchers: int
    rss_per_watcher: float
    traced_per_watcher: float | None = None
    allocated_in: dict[str, float] = field(default_factory=dict)
    on_behalf_of: dict[str, float] = field(default_factory=dict)
    sites: list[tuple[float, float, list[str]]] = field(default_factory=list)
    objects: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)


def compare(before: Point, after: Point, n: int, top: int) -> Report:
    report = Report(watchers=n, rss_per_watcher=(after.rss_kb - before.rss_kb) * 1024 / n)
    objects = after.objects.copy()
    objects.subtract(before.objects)
    report.objects = {k: v / n for k, v in objects.most_common() if abs(v) >= n / 10}
    tasks = after.tasks.copy()
    tasks.subtract(before.tasks)
    report.tasks = {k: v / n for k, v in tasks.items() if v}
    if before.snapshot is None or after.snapshot is None:
        return report
    diffs = after.snapshot.compare_to(before.snapshot, "traceback")
    allocated: Counter[str] = Counter()
    behalf: Counter[str] = Counter()
    total = 0
    for d in diffs:
        frames = list(reversed(d.traceback))  # innermost first
        allocated[attribute(frames, frozenset())] += d.size_diff
        behalf[attribute(frames, frozenset({"trio"}))] += d.size_diff
        total += d.size_diff
    report.traced_per_watcher = total / n
    report.allocated_in = {k: allocated[k] / n for k in LAYER_ORDER}
    report.on_behalf_of = {k: behalf[k] / n for k in LAYER_ORDER}
    # Sites: the innermost frame that is not the standard library, with two callers.
    sites: dict[tuple[str, ...], list[float]] = {}
    for d in diffs:
        frames = list(reversed(d.traceback))
        start = next((i for i, f in enumerate(frames) if layer_of(f.filename)), 0)
        # ...and where the first frame outside trio asked for it.
        asker = next(
            (f for f in frames[start:] if layer_of(f.filename) not in (None, "trio")), None
        )
        chosen = frames[start : start + 2]
        if asker is not None and asker not in chosen:
            chosen.append(asker)
        key = tuple(short(f) for f in chosen)
        entry = sites.setdefault(key, [0.0, 0.0])
        entry[0] += d.size_diff
        entry[1] += d.count_diff
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    report.sites = [(size / n, count / n, list(key)) for key, (size, count) in ranked]
    return report


def print_report(r: Report) -> None:
    print(f"watchers: {r.watchers}")
    print(f"RSS per watcher: {r.rss_per_watcher:,.0f} B")
    if r.traced_per_watcher is not None:
        print(f"traced (tracemalloc) per watcher: {r.traced_per_watcher:,.0f} B")
        print(f"\n{'layer':<20}{'allocated in':>14}{'on behalf of':>14}")
        for layer in LAYER_ORDER:
            a, b = r.allocated_in[layer], r.on_behalf_of[layer]
            print(f"{layer:<20}{a:>14,.0f}{b:>14,.0f}")
        print("\ntop sites (bytes, blocks per watcher; innermost library frame, its caller,")
        print("the first frame outside trio):")
        for size, count, key in r.sites:
            print(f"{size:>8,.0f} B {count:>6.2f}  " + "  <  ".join(key))
    print("\nobjects per watcher (gc-tracked, |diff| >= 0.1):")
    for name, per in r.objects.items():
        print(f"{per:>8.2f}  {name}")
    print("\ntrio tasks per watcher:")
    for name, per in sorted(r.tasks.items(), key=lambda kv: -kv[1]):
        print(f"{per:>8.2f}  {name}")


# -- the client (a child process) ------------------------------------------------------


def request_head(port: int, token: str, cid: str) -> bytes:
    # The harness's head (tests/bench/loadgen.py), so header-sized costs match.
    lines = [
        f"GET /api/ai/conversations/{cid}/watch HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {token}",
        "Accept: text/event-stream",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def run_client(port: int, token: str, cids: list[str], count: int) -> int:
    """Open `count` streams, each read up to `:ok`; say "ready"; close on "close"."""
    socks: list[socket.socket] = []
    pending: dict[socket.socket, bytes] = {}
    sel = selectors.DefaultSelector()
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request_head(port, token, cids[i % len(cids)]))
        s.setblocking(False)
        socks.append(s)
        pending[s] = b""
        sel.register(s, selectors.EVENT_READ)
    while pending:
        events = sel.select(timeout=CLIENT_DEADLINE)
        if not events:
            print(f"timeout: {len(pending)} streams without :ok", flush=True)
            return 1
        for key, _ in events:
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            data = ready.recv(65536)
            if not data:
                print(f"closed before :ok: {pending[ready][:200]!r}", flush=True)
                return 1
            buf = pending[ready] + data
            if OK in buf:
                del pending[ready]
                sel.unregister(ready)
            else:
                pending[ready] = buf
    print("ready", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    print("closed", flush=True)
    return 0


# -- the server side (this process) ----------------------------------------------------


class Client:
    """The client child: `open` returns once every stream had `:ok`."""

    def __init__(self, port: int, token: str, cids_file: Path, count: int) -> None:
        self._args = [
            sys.executable,
            __file__,
            "--client",
            str(port),
            token,
            str(cids_file),
            str(count),
        ]
        self._proc: trio.Process | None = None
        self._buf = b""

    async def _line(self) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while b"\n" not in self._buf:
            data = await self._proc.stdout.receive_some(4096)
            if not data:
                raise RuntimeError(f"client exited: {self._buf!r}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    async def open(self) -> None:
        self._proc = await trio.lowlevel.open_process(self._args, stdin=-1, stdout=-1, stderr=None)
        with trio.fail_after(CLIENT_DEADLINE):
            line = await self._line()
        if line != "ready":
            raise RuntimeError(f"client: {line}")

    async def close(self) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        await self._proc.stdin.send_all(b"close\n")
        with trio.fail_after(60):
            await self._line()
            await self._proc.wait()


async def settle(baseline: int, limit: float = 60.0) -> None:
    """Until the server is back to `baseline` tasks (the warm-up's streams ended)."""
    from tests.polling import poll_until

    async def settled() -> bool:
        return len(trio_tasks()) <= baseline

    await poll_until(settled, limit)


async def measure(args: argparse.Namespace) -> Report:
    from app import service
    from app.config import Settings
    from app.listen import make_listener
    from app.store import SQLiteStore
    from tests.natsproc import NatsProcess

    n = args.watchers
    tmp = Path(tempfile.mkdtemp(prefix="conn-memory-"))
    token = "conn-memory-token"
    cids = [str(uuid.uuid4()) for _ in range(args.conversations)]
    store = SQLiteStore(tmp / "cw.db")
    await store.seed({"u1": "u"}, {token: "u1"}, dict.fromkeys(cids, "u1"))
    await store.aclose()
    cids_file = tmp / "cids"
    cids_file.write_text("\n".join(cids))
    nats = NatsProcess(jetstream=False)
    nats.start()
    try:
        settings = Settings(
            nats_urls=(nats.url,),
            database_url=f"sqlite:///{tmp / 'cw.db'}",
            history="off",
            max_watchers=n + 1000,
            max_watchers_per_session=n + 1000,
            log_level="warning",
        )
        listener = make_listener("127.0.0.1", 0, write_timeout=settings.write_timeout)
        port = listener.getsockname()[1]
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    service.run, settings, shutdown=stop, handle_signals=False, listener=listener
                )
            )
            # Warm-up: first-use caches (routing, regexes, imports) go in the baseline.
            idle_tasks = len(trio_tasks())
            warm = Client(port, token, cids_file, min(50, n))
            await warm.open()
            await warm.close()
            await settle(idle_tasks)
            progress("warm-up done")
            if args.trace:
                # Only what is allocated from here on is traced: the baseline snapshot
                # is nearly empty and the comparison quick.
                tracemalloc.start(args.frames)
            before = take(args.trace)
            progress("baseline taken")
            client = Client(port, token, cids_file, n)
            await client.open()
            progress(f"{n} streams had :ok")
            after = take(args.trace)
            progress("measured")
            await client.close()
            stop.set()
    finally:
        nats.stop()
    report = compare(before, after, n, args.top)
    progress("compared")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument(
        "--conversations", type=int, default=0, help="default: one per 5 watchers (the harness's)"
    )
    parser.add_argument("--frames", type=int, default=25, help="tracemalloc traceback depth")
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--client", nargs=4, metavar=("PORT", "TOKEN", "CIDS", "N"))
    args = parser.parse_args(argv)
    if args.client:
        port, token, cids_path, count = args.client
        return run_client(int(port), token, Path(cids_path).read_text().split(), int(count))
    args.conversations = args.conversations or max(1, args.watchers // 5)
    report = trio.run(measure, args)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report.__dict__, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
