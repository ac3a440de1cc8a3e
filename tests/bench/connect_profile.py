"""Where one connect's time goes: chatwatch in this process, the watchers in a child.

    python tests/bench/connect_profile.py [--watchers 5000] [--conversations 1000]
        [--concurrency 256] [--rounds 3] [--mode time,count[,pyspy][,cprofile]]
        [--hypercorn-idle-task] [--gc-threshold A,B,C] [--json OUT]

(``pip install py-spy`` for ``--mode ...,pyspy``. The figures in docs/findings.md
came from ``--rounds 1 --mode time,pyspy,count`` and three ``--mode time,count``.)

The idle scenario's connect phase, taken apart. A nats-server (no JetStream) and a
seeded SQLite store are started, chatwatch is served in this process by
`service.run` (history off, as the idle scenario), and a child process (this file,
``--client``) opens the watchers with the load generator's own client
(`loadgen.Watcher`, at most `--concurrency` between connect and `:ok`). Between the
child's first connect and its last `:ok` this process measures, per connect:

- ``time``: wall time and this process's CPU time (every thread: the SQLite worker
  threads and the asyncio side of nats-py included) per connect, and the store's and
  the SUB batches (how many, how large, how long they took);
- ``count``: scheduler passes (a trio Instrument's ``before_io_wait``), task steps and
  tasks spawned per connect: deterministic enough to compare a change without timing;
- ``cprofile``: cProfile over the window; each stage's inclusive CPU time per connect
  (cProfile, timed by the trio thread's CPU clock, counts a coroutine's time while it
  runs, not while it waits), scaled back to the uninstrumented trio-thread CPU time
  of the ``time`` rounds, with cProfile's overhead factor left visible (large: the
  CPU clock is a system call, so call-heavy code is overweighted);
- ``pyspy``: py-spy sampling this process (``py-spy`` beside this Python; it needs
  ptrace): each stage's share of the trio thread's samples times the ``time``
  rounds' trio-thread CPU per connect. Cheap, so the stages keep their proportions.

Garbage collections are timed (gc.callbacks) in every round and reported apart; in
the ``pyspy`` and ``cprofile`` rounds the collector is off, since a sampled collection
would be charged to whichever line allocated last, and the stages share the trio
thread's CPU less the collections.

The child and nats-server run in other processes, so the figures are the server's.
Rounds after the first reuse the server (warm: the watchers of a round are gone,
and their subscriptions with them, before the next round starts).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
BENCH = HERE.parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: `tests` and `app` importable

import trio  # ruff: ignore[module-import-not-at-top-of-file]
import trio.lowlevel  # ruff: ignore[module-import-not-at-top-of-file]

from app import idletask, service, store, subscriptions  # ruff: ignore[module-import-not-at-top-of-file]
from app.config import Settings  # ruff: ignore[module-import-not-at-top-of-file]
from app.listen import make_listener  # ruff: ignore[module-import-not-at-top-of-file]
from app.workers import tune_gc  # ruff: ignore[module-import-not-at-top-of-file]
from tests.bench import loadgen  # ruff: ignore[module-import-not-at-top-of-file]
from tests.natsproc import NatsProcess  # ruff: ignore[module-import-not-at-top-of-file]

# (label, file suffix, function name, depth): inclusive stages, nested by depth.
STAGES: list[tuple[str, str, str, int]] = [
    (
        "accept (trio serve_listeners)",
        "trio/_highlevel_serve_listeners.py",
        "_serve_one_listener",
        0,
    ),
    ("connection task (hypercorn TCPServer.run)", "hypercorn/trio/tcp_server.py", "run", 0),
    ("  h11 protocol handle (parse + events)", "hypercorn/protocol/h11.py", "handle", 1),
    ("    h11 next_event (parse)", "h11/_connection.py", "next_event", 2),
    (
        "    hypercorn _create_stream (scope, spawn app)",
        "hypercorn/protocol/h11.py",
        "_create_stream",
        2,
    ),
    ("  idle task restart (nursery.start)", "hypercorn/trio/worker_context.py", "restart", 1),
    ("idle timeout task (hypercorn)", "hypercorn/trio/tcp_server.py", "_idle_timeout", 0),
    (
        "app task (hypercorn _handle -> Quart-Trio __call__)",
        "hypercorn/trio/task_group.py",
        "_handle",
        0,
    ),
    ("  request object from scope", "quart/asgi.py", "_create_request_from_scope", 1),
    ("message task (Quart-Trio handle_messages)", "quart_trio/asgi.py", "handle_messages", 0),
    ("request task (Quart-Trio handle_request)", "quart_trio/asgi.py", "handle_request", 0),
    ("  QuartTrio.handle_request", "quart_trio/app.py", "handle_request", 1),
    ("    preprocess_request", "quart/app.py", "preprocess_request", 2),
    ("    url match (werkzeug)", "werkzeug/routing/map.py", "match", 2),
    ("    dispatch_request", "quart/app.py", "dispatch_request", 2),
    ("      our route (http.watch)", "app/http.py", "watch", 3),
    ("        store.authorize", "app/store.py", "authorize", 4),
    ("          store batch (trio side)", "app/store.py", "_authorize_batch", 5),
    ("    finalize_request", "quart/app.py", "finalize_request", 2),
    ("  _send_response (head + body)", "quart/asgi.py", "_send_response", 1),
    ("    WatchBody.__aenter__", "app/watch.py", "__aenter__", 2),
    ("      Hub.join", "app/hub.py", "join", 3),
    ("    WatchBody.__anext__", "app/watch.py", "__anext__", 2),
    ("    hypercorn app_send", "hypercorn/protocol/http_stream.py", "app_send", 2),
    ("admission task (Hub.admit)", "app/hub.py", "admit", 0),
    ("topic task (Hub._run_topic)", "app/hub.py", "_run_topic", 0),
    ("SUB batch task (trio side)", "app/subscriptions.py", "_run_batch", 0),
    ("SUB batch (asyncio side)", "app/subscriptions.py", "_apply", 0),
]


class GCTimes:
    """Collections the interpreter ran, per generation: how many and their CPU time
    (on the thread that ran each: on a busy machine wall time is mostly waiting).

    Attribution matters here: a sampling profiler charges a collection to whichever
    line allocated the object that triggered it.
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.thread_time() - self._started

    def summary(self, connects: int) -> dict[str, Any]:
        return {
            "collections": list(self.count),
            "us_per_connect": [round(s / connects * 1e6, 1) for s in self.seconds],
        }


class Counter(trio.abc.Instrument):
    """Scheduler passes, task steps and spawned tasks, summed over the run."""

    def __init__(self) -> None:
        self.passes = 0
        self.steps = 0
        self.spawned = 0
        self.steps_by_task: dict[str, int] = {}

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        name = getattr(task.coro, "__qualname__", "?")
        self.steps_by_task[name] = self.steps_by_task.get(name, 0) + 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1

    def snapshot(self) -> tuple[int, int, int]:
        return self.passes, self.steps, self.spawned


@dataclass
class Batches:
    """Calls of one batching function: how many, their sizes, how long each took."""

    sizes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def summary(self, connects: int) -> dict[str, Any]:
        if not self.sizes:
            return {"batches": 0}
        return {
            "batches": len(self.sizes),
            "per_connect": round(len(self.sizes) / connects, 4),
            "size_median": statistics.median(self.sizes),
            "size_max": max(self.sizes),
            "ms_median": round(statistics.median(self.seconds) * 1000, 3),
            "ms_max": round(max(self.seconds) * 1000, 3),
        }


def timed_batches(
    owner: type, name: str, size_of: Callable[..., int], into: Batches
) -> Callable[[], None]:
    """Wrap an async method of `owner` to record each call; returns the undo."""
    original = getattr(owner, name)

    async def wrapper(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args)
        finally:
            into.sizes.append(size_of(*args))
            into.seconds.append(time.perf_counter() - started)

    wrapper.__name__ = original.__name__
    wrapper.__qualname__ = original.__qualname__
    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def stage_table(stats: pstats.Stats, connects: int, scale: float) -> list[dict[str, Any]]:
    """Each stage's inclusive profiled time per connect (us), and scaled by `scale`."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for label, suffix, func, _depth in STAGES:
        cum = 0.0
        calls = 0
        for (filename, _line, name), (_cc, nc, _tt, ct, _callers) in raw.items():
            if name == func and filename.endswith(suffix):
                cum += ct
                calls += nc
        rows.append(
            {
                "stage": label,
                "profiled_us": round(cum / connects * 1e6, 1),
                "us": round(cum / connects * 1e6 * scale, 1),
                "resumes_per_connect": round(calls / connects, 2),
            }
        )
    return rows


def top_functions(stats: pstats.Stats, connects: int, n: int = 30) -> list[str]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    items = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    out = []
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in items:
        short = "/".join(Path(filename).parts[-2:])
        out.append(
            f"{tt / connects * 1e6:8.1f} us self {ct / connects * 1e6:8.1f} us incl "
            f"{nc / connects:6.2f}/conn  {short}:{line} {name}"
        )
    return out


async def start_pyspy(nursery: trio.Nursery, out: Path) -> trio.Process:
    """py-spy sampling this process (the trio thread and the rest) until SIGINT."""
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "--pid", str(os.getpid()), "--rate", "200", "--nonblocking"]
    cmd += ["--format", "raw", "--output", str(out)]
    proc: trio.Process = await nursery.start(
        partial(trio.run_process, cmd, check=False, stdout=subprocess.DEVNULL)
    )
    await trio.sleep(0.5)  # attached (py-spy reads the interpreter's state first)
    return proc


def read_pyspy(path: Path) -> dict[str, int]:
    """Collapsed stacks ("frame;frame;... count") -> samples."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[stack] = out.get(stack, 0) + int(count)
    return out


def pyspy_shares(samples: dict[str, int]) -> dict[str, float]:
    """Each stage's share of the trio thread's samples (a sample counts for every stage
    on its stack, so nested stages include their children)."""
    trio_stacks = {k: v for k, v in samples.items() if "unrolled_run" in k}
    total = sum(trio_stacks.values()) or 1
    shares: dict[str, float] = {"trio thread samples": float(total)}
    for label, suffix, func, _depth in STAGES:
        hit = 0
        for stack, count in trio_stacks.items():
            for frame in stack.split(";"):
                name, _, where = frame.partition(" (")
                if (name == func or name.endswith("." + func)) and suffix in where:
                    hit += count
                    break
        shares[label] = round(hit / total, 4)
    return shares


# -- the child: the watchers ------------------------------------------------------------


async def client_main(port: int, pairs: list[list[str]], concurrency: int) -> None:
    """Connect every watcher, report, hold them open until stdin closes."""
    tally = loadgen.Tally()
    requests = [loadgen.WatchRequest(cid, token) for cid, token in pairs]
    watchers = [loadgen.Watcher(r, 1, tally) for r in requests]
    target = loadgen.Target("127.0.0.1", port, "", "", None, None, {})
    sc = loadgen.Scenario(connect_concurrency=concurrency)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        print("go", flush=True)
        all_ok = await loadgen.start_all(target, watchers, sc, nursery)
        statuses: dict[str, int] = {}
        for w in watchers:
            statuses[str(w.status)] = statuses.get(str(w.status), 0) + 1
        ttfb = sorted(w.ttfb_ns / 1e6 for w in watchers)
        print(
            json.dumps(
                {
                    "all_ok_s": round(all_ok, 3),
                    "statuses": statuses,
                    "ttfb_ms_p50": loadgen.percentile(ttfb, 50),
                }
            ),
            flush=True,
        )
        while await stdin.receive_some(1024):
            pass
        nursery.cancel_scope.cancel()


# -- the server side --------------------------------------------------------------------


@dataclass
class Setup:
    port: int
    requests_file: Path
    connects: int
    nats: NatsProcess


async def read_line(stream: trio.abc.ReceiveStream, buf: bytearray) -> str:
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError("the client ended early")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


async def wait_subscriptions_gone(nats: NatsProcess, limit: float = 60.0) -> None:
    with trio.fail_after(limit):
        # Another process's state: nothing to wait on but its monitor, polled.
        while True:
            if not await nats.chat_subscriptions_async():
                return
            await trio.sleep(0.1)


async def one_round(
    setup: Setup, mode: str, concurrency: int, counter: Counter, out_dir: Path, index: int
) -> dict[str, Any]:
    auth = Batches()
    subs = Batches()
    undo = [
        timed_batches(store.SQLiteStore, "_authorize_batch", lambda _s, b: len(b), auth),
        timed_batches(
            subscriptions.SubscriptionManager, "_run_batch", lambda _s, s, u: len(s), subs
        ),
    ]
    # On-CPU time of the trio thread: a syscall's wall time on a busy machine is
    # mostly waiting for a core, which no change here can remove.
    profiler = cProfile.Profile(time.thread_time) if mode == "cprofile" else None
    collections = GCTimes()
    if mode == "count":
        counter.steps_by_task.clear()
        trio.lowlevel.add_instrument(counter)
    cmd = [
        sys.executable,
        str(HERE),
        "--client",
        str(setup.port),
        str(setup.requests_file),
        str(concurrency),
    ]
    try:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    check=True,
                )
            )
            assert proc.stdout is not None
            assert proc.stdin is not None
            buf = bytearray()
            with trio.fail_after(30):
                await read_line(proc.stdout, buf)  # "go": the child is connecting now
            c0 = counter.snapshot()
            gc.callbacks.append(collections)
            if mode in ("pyspy", "cprofile"):
                # Collections are measured in the ``time`` rounds; here they would be
                # charged to whichever line happened to allocate.
                gc.disable()
            cpu0 = time.process_time()
            trio_cpu0 = time.thread_time()
            wall0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            spy = (
                await start_pyspy(nursery, out_dir / f"connect-{index}.pyspy")
                if mode == "pyspy"
                else None
            )
            with trio.fail_after(300):
                report = json.loads(await read_line(proc.stdout, buf))
            if profiler is not None:
                profiler.disable()
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            trio_cpu = time.thread_time() - trio_cpu0
            c1 = counter.snapshot()
            gc.callbacks.remove(collections)
            gc.enable()
            await proc.stdin.aclose()  # the child closes its watchers and exits
            await proc.stdout.aclose()
    finally:
        for u in undo:
            u()
        if mode == "count":
            trio.lowlevel.remove_instrument(counter)
    await wait_subscriptions_gone(setup.nats)
    n = setup.connects
    result: dict[str, Any] = {
        "round": index,
        "mode": mode,
        "client": report,
        "server_wall_s": round(wall, 3),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_connect": round(cpu / n * 1e6, 1),
        "trio_cpu_us_per_connect": round(trio_cpu / n * 1e6, 1),
        "gc": collections.summary(n),
        "auth_batches": auth.summary(n),
        "sub_batches": subs.summary(n),
    }
    if mode == "count":
        result["per_connect"] = {
            "scheduler_passes": round((c1[0] - c0[0]) / n, 3),
            "task_steps": round((c1[1] - c0[1]) / n, 2),
            "tasks_spawned": round((c1[2] - c0[2]) / n, 2),
        }
        by_task = sorted(counter.steps_by_task.items(), key=lambda kv: -kv[1])
        result["task_steps_by_coroutine"] = {k: round(v / n, 3) for k, v in by_task[:20]}
    if mode == "pyspy":
        samples = read_pyspy(out_dir / f"connect-{index}.pyspy")
        result["pyspy"] = str(out_dir / f"connect-{index}.pyspy")
        result["samples"] = sum(samples.values())
        result["stage_shares"] = pyspy_shares(samples)
    if profiler is not None:
        path = out_dir / f"connect-{index}.pstats"
        profiler.dump_stats(path)
        stats = pstats.Stats(str(path))
        result["pstats"] = str(path)
        result["stages"] = stage_table(stats, n, 1.0)
        result["top_self"] = top_functions(stats, n)
    return result


async def serve_and_measure(
    args: argparse.Namespace, setup: Setup, db: Path
) -> list[dict[str, Any]]:
    settings = Settings(
        bind=f"127.0.0.1:{setup.port}",
        nats_urls=(setup.nats.url,),
        database_url=f"sqlite:///{db}",
        history="off",
        max_watchers=args.watchers + 100,
        max_watchers_per_session=args.watchers + 100,
        log_level="warning",
        # No keepalive round inside a (slow, profiled) connect phase: its writes are
        # not a connect's.
        keepalive=3600.0,
    )
    listener = make_listener("127.0.0.1", setup.port, write_timeout=settings.write_timeout)
    stop = trio.Event()
    results = []
    counter = Counter()
    out_dir = Path(args.out_dir)
    async with trio.open_nursery() as nursery:
        run: Callable[..., Awaitable[None]] = partial(
            service.run, settings, shutdown=stop, handle_signals=False, listener=listener
        )
        await nursery.start(run)
        for i in range(args.rounds):
            for mode in args.mode.split(","):
                r = await one_round(setup, mode, args.concurrency, counter, out_dir, i)
                print(json.dumps({k: v for k, v in r.items() if k != "top_self"}), file=sys.stderr)
                results.append(r)
        stop.set()
    return results


def make_auth(
    watchers: int, conversations: int
) -> tuple[dict[str, str], dict[str, str], dict[str, str], list[list[str]]]:
    """One user and session per conversation (as the harness's auth file: several)."""
    users: dict[str, str] = {}
    sessions: dict[str, str] = {}
    convs: dict[str, str] = {}
    owned: list[tuple[str, str]] = []
    for i in range(conversations):
        user = f"user-{i}"
        token = f"token-{uuid.uuid4().hex}"
        cid = str(uuid.uuid4())
        users[user] = user
        sessions[token] = user
        convs[cid] = user
        owned.append((cid, token))
    per = watchers // conversations
    requests = [[cid, token] for cid, token in owned for _ in range(per)]
    return users, sessions, convs, requests


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r for r in results if r["mode"] == "time"]
    out: dict[str, Any] = {}
    if times:
        out["all_ok_s_median"] = statistics.median(r["client"]["all_ok_s"] for r in times)
        out["cpu_us_per_connect_median"] = statistics.median(r["cpu_us_per_connect"] for r in times)
        out["trio_cpu_us_per_connect_median"] = statistics.median(
            r["trio_cpu_us_per_connect"] for r in times
        )
        out["gc_us_per_connect_median"] = [
            statistics.median(r["gc"]["us_per_connect"][g] for r in times) for g in range(3)
        ]
        # What the stages below share: the trio thread's CPU less the collections.
        out["trio_cpu_less_gc_us"] = round(
            out["trio_cpu_us_per_connect_median"] - sum(out["gc_us_per_connect_median"]), 1
        )
    counts = [r for r in results if r["mode"] == "count"]
    if counts:
        out["per_connect_median"] = {
            k: statistics.median(r["per_connect"][k] for r in counts)
            for k in counts[0]["per_connect"]
        }
    spies = [r for r in results if r["mode"] == "pyspy"]
    if spies and times:
        # A stage's share of the trio thread's samples times its CPU per connect.
        cpu = out["trio_cpu_less_gc_us"]
        out["pyspy_stages_us"] = {
            label: round(statistics.median(r["stage_shares"][label] for r in spies) * cpu, 1)
            for label in spies[0]["stage_shares"]
            if label != "trio thread samples"
        }
    profiles = [r for r in results if r["mode"] == "cprofile"]
    if profiles and times:
        # cProfile's own overhead inflates every stage about alike: scale them back to
        # the uninstrumented CPU per connect, and say by how much.
        cpu = out["trio_cpu_less_gc_us"]
        prof_cpu = statistics.median(r["trio_cpu_us_per_connect"] for r in profiles)
        scale = cpu / prof_cpu
        out["cprofile_overhead_x"] = round(prof_cpu / cpu, 2)
        out["stages_us"] = {
            row["stage"]: round(
                statistics.median(r["stages"][i]["profiled_us"] for r in profiles) * scale, 1
            )
            for i, row in enumerate(profiles[0]["stages"])
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--watchers", type=int, default=5000)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--mode", default="time,count", help="comma-separated: time,count,cprofile,pyspy"
    )
    ap.add_argument("--out-dir", default=tempfile.gettempdir() + "/connect-profile")
    ap.add_argument(
        "--hypercorn-idle-task",
        action="store_true",
        help="keep hypercorn's own idle timer (app/idletask.py not installed): the before",
    )
    ap.add_argument("--gc-threshold", help="A,B,C: gc.set_threshold after tune_gc (to compare)")
    ap.add_argument("--json", type=Path, help="write every round and the summary here")
    ap.add_argument(
        "--client", nargs=3, metavar=("PORT", "REQUESTS", "CONCURRENCY"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.client:
        port, requests_file, concurrency = args.client
        pairs = json.loads(Path(requests_file).read_text())
        trio.run(client_main, int(port), pairs, int(concurrency))
        return 0
    users, sessions, convs, requests = make_auth(args.watchers, args.conversations)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="chatwatch-connect-profile-"))
    requests_file = workdir / "requests.json"
    requests_file.write_text(json.dumps(requests))
    db = workdir / "chatwatch.db"

    async def seed() -> None:
        s = store.SQLiteStore(db)
        try:
            await s.seed(users, sessions, convs)
        finally:
            await s.aclose()

    trio.run(seed)
    nats = NatsProcess(jetstream=False)
    nats.start()
    try:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        setup = Setup(port, requests_file, len(requests), nats)
        if args.hypercorn_idle_task:
            idletask.install = lambda: False  # service.run installs it otherwise
        tune_gc()  # as `chatwatch serve` does, after every import
        if args.gc_threshold:
            gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
        results = trio.run(serve_and_measure, args, setup, db)
    finally:
        nats.stop()
    summary = summarize(results)
    print(json.dumps(summary, indent=1))
    for r in results:
        if r["mode"] == "cprofile":
            print("\n".join(r["top_self"]))
            break
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
