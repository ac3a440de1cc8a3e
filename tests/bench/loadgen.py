"""The benchmark's load generator: raw-socket SSE watchers and a raw NATS publisher, in trio.

    python -m tests.bench.loadgen --base-url http://127.0.0.1:PORT --nats-url nats://... \
        --monitor-url http://127.0.0.1:MPORT --auth-file auth.json --scenario broadcast \
        [--set watchers=100 ...] [--server-pid PID] [--nats-pid PID] --out result.json

One process, one trio loop, so that publish and receive times come from one clock and
latency is receive minus publish. Watchers are plain TCP sockets speaking HTTP/1.1
(chunked or close-delimited bodies), not an HTTP library: what is measured is the
server, and a frame counts only when it was split out of the byte stream on a blank
line and its `data:` JSON carries this generator's conversation, sequence and time.
The NATS publisher speaks the text protocol directly (PUB, PING/PONG) for the same
reason, and so that the generator needs nothing beyond trio.

Resume (the `resume` scenario, a server with history on): every watcher keeps the last
`id:` it saw, and `Watcher.resumed` opens a new connection that sends it back as
`Last-Event-ID`, carrying over what was already received, so the same accounting
(missing, duplicate, out of order) runs across the disconnect and the replay.

The result is one JSON object (see `Result`), the shape `tests/bench/report.py` reads.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import random
import socket
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
import trio.lowlevel

# -- scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What one run does. C = conversations, W = watchers per conversation."""

    conversations: int = 1
    watchers: int = 1000
    messages: int = 2000  # chunks per conversation, then one final chat.message
    rate: float = 0.0  # messages/s over all conversations; 0: as fast as possible
    idle_s: float = 0.0  # connected and quiet this long before publishing
    text_bytes: int = 32
    connect_concurrency: int = 256
    # churn: waves of C x W watchers, some aborted right after the request, the rest
    # dropped abruptly after receiving for churn_receive_s, under `rate` msg/s.
    churn_waves: int = 0
    churn_abort_fraction: float = 0.1
    churn_receive_s: float = 1.0
    # resume: every watcher is dropped after this many chunks, the rest (messages - this
    # chunks + the final) is published while they are away, then all reconnect sending
    # the last id they saw as Last-Event-ID (0: never; needs a server that writes ids)
    resume_after: int = 0
    deadline_s: float = 120.0  # the whole delivery phase must end within this


SCENARIOS: dict[str, Scenario] = {
    "broadcast": Scenario(conversations=1, watchers=1000, messages=2000),
    "paced": Scenario(conversations=1, watchers=1000, messages=200, rate=10.0),
    "many": Scenario(conversations=1000, watchers=1, messages=20),
    "idle": Scenario(conversations=1000, watchers=5, messages=1, idle_s=10.0),
    "churn": Scenario(conversations=100, watchers=20, messages=0, rate=2000.0, churn_waves=5),
    # 100 events live, then each watcher 500 behind (499 chunks and the final message)
    "resume": Scenario(conversations=1, watchers=1000, messages=599, resume_after=100),
}


def with_overrides(base: Scenario, pairs: list[str]) -> Scenario:
    """`--set key=value` pairs applied to a scenario, typed as its fields are."""
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"loadgen: --set {pair!r}: expected one of {sorted(types)}=VALUE")
        changes[key] = types[key](value)
    return replace(base, **changes)


# -- SSE over a raw socket ------------------------------------------------------------


class BodyDecoder:
    """HTTP/1.1 response body bytes -> payload bytes, chunked or not, incrementally."""

    def __init__(self, chunked: bool) -> None:
        self._chunked = chunked
        self._buf = b""
        self._left = 0  # bytes of the current chunk still to come (+2 for its CRLF)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self._chunked:
            return data
        if self.done:  # the last chunk's trailer
            return b""
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while pos < len(buf):
            if self._left < 0:  # the CRLF after a chunk's data
                take = min(-self._left, len(buf) - pos)
                pos += take
                self._left += take
                continue
            if self._left > 0:
                take = min(self._left, len(buf) - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = -2
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(buf[pos:end].split(b";", 1)[0], 16)
            pos = end + 2
            if size == 0:
                self.done = True
                pos = len(buf)
                break
            self._left = size
        self._buf = buf[pos:]
        return b"".join(out)


@dataclass
class Tally:
    """What the watchers of one run received, summed."""

    frames: int = 0
    comments: int = 0
    misrouted: int = 0
    bad_frames: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    final_before_chunks: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ns: array.array[int] = field(default_factory=lambda: array.array("q"))


@dataclass
class WatchRequest:
    conversation: str
    token: str
    last_event_id: str | None = None


class Watcher:
    """One SSE client. `seen` holds the sequence numbers received, per watcher."""

    def __init__(self, req: WatchRequest, expected_final: int, tally: Tally) -> None:
        self.req = req
        self.expected_final = expected_final
        self.tally = tally
        self.status = 0
        self.headers: dict[str, str] = {}
        self.seen: set[int] = set()
        self.highest = -1
        self.last_id: str | None = None
        self.ttfb_ns = 0
        self.ok_ns = 0  # when `:ok` arrived (0: not yet)
        self.final_ns = 0  # when the final message arrived (0: not yet)
        self.closed_ns = 0
        self.ok_event = trio.Event()
        self.final_event = trio.Event()
        # the final message, an error event or the end of the stream: nothing more is
        # owed to a resumed watcher, which is not waited for beyond it
        self.settled = trio.Event()
        self.stream: trio.SocketStream | None = None
        # wait_for_seq's wake-up: checked per frame only against an int, so that the
        # frame path of broadcast (the loadgen's ceiling) stays as it was.
        self._wake_at = sys.maxsize
        self._progress = trio.Event()

    def resumed(self) -> Watcher:
        """A new connection for this watcher sending the last id it saw: what it already
        received carries over, so a replayed duplicate or a skipped event counts."""
        req = replace(self.req, last_event_id=self.last_id)
        again = Watcher(req, self.expected_final, self.tally)
        again.seen = self.seen
        again.highest = self.highest
        again.last_id = self.last_id
        return again

    async def wait_for_seq(self, seq: int) -> None:
        """Until an event numbered `seq` or later has arrived, or the stream has ended."""
        while self.highest < seq and not self.closed_ns:
            self._wake_at = seq
            self._progress = trio.Event()
            await self._progress.wait()

    async def run(self, host: str, port: int, started_ns: int) -> None:
        """Connect, read the head, then frames until EOF or cancellation."""
        stream = await trio.open_tcp_stream(host, port)
        self.stream = stream
        try:
            await stream.send_all(self._request(host, port))
            await self._read(stream, started_ns)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server hung up, or `abort` closed the socket under us
        finally:
            self.closed_ns = time.monotonic_ns()
            self._progress.set()
            self.settled.set()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    def _request(self, host: str, port: int) -> bytes:
        lines = [
            f"GET /api/ai/conversations/{self.req.conversation}/watch HTTP/1.1",
            f"Host: {host}:{port}",
            f"Authorization: Bearer {self.req.token}",
            "Accept: text/event-stream",
        ]
        if self.req.last_event_id is not None:
            lines.append(f"Last-Event-ID: {self.req.last_event_id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _read(self, stream: trio.SocketStream, started_ns: int) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            if not self.ttfb_ns:
                self.ttfb_ns = time.monotonic_ns() - started_ns
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status != 200:
            self.ok_event.set()
            self.final_event.set()
            return
        decoder = BodyDecoder("chunked" in self.headers.get("transfer-encoding", ""))
        pending = b""
        data = rest
        while True:
            now = time.monotonic_ns()
            pending += decoder.feed(data)
            if b"\n\n" in pending:
                *frames, pending = pending.split(b"\n\n")
                for frame in frames:
                    self._frame(frame, now)
            if decoder.done:
                return
            data = await stream.receive_some(262144)
            if not data:
                return

    def _frame(self, frame: bytes, now: int) -> None:
        tally = self.tally
        if frame.startswith(b":"):
            if frame in (b":ok", b": ok"):
                if not self.ok_ns:
                    self.ok_ns = now
                    self.ok_event.set()
            else:
                tally.comments += 1
            return
        data_line = None
        for line in frame.split(b"\n"):
            if line.startswith(b"data:"):
                data_line = line[5:]
            elif line.startswith(b"id:"):
                self.last_id = line[3:].strip().decode()
        if data_line is None:
            return  # retry: and other control blocks
        try:
            obj = json.loads(data_line)
            event, data = obj["event"], obj["data"]
        except (ValueError, KeyError, TypeError):
            tally.bad_frames += 1
            return
        if event == "error" or not isinstance(data, dict) or "seq" not in data:
            tally.errors.append(str(data)[:200])
            self.settled.set()
            return
        tally.frames += 1
        if data.get("conv") != self.req.conversation:
            tally.misrouted += 1
            return
        seq = data["seq"]
        final = bool(data.get("final"))
        if event != ("message" if final else data.get("chunk_type")):
            tally.bad_frames += 1
        if seq in self.seen:
            tally.duplicates += 1
            return
        if seq < self.highest:
            tally.out_of_order += 1
        self.seen.add(seq)
        self.highest = max(self.highest, seq)
        tally.latencies_ns.append(now - data["ts"])
        if seq >= self._wake_at:
            self._progress.set()
        if final:
            if len(self.seen) < self.expected_final + 1:
                tally.final_before_chunks += 1
            self.final_ns = now
            self.final_event.set()
            self.settled.set()

    def abort(self, *, reset: bool) -> None:
        """Drop the connection abruptly: FIN, or RST when `reset` (SO_LINGER 0)."""
        stream = self.stream
        if stream is None:
            return
        if reset:
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        stream.socket.close()


# -- NATS publisher over a raw socket -------------------------------------------------


class Publisher:
    """PUB over NATS's text protocol; `flush` is a PING answered by a PONG."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        # The reader answers the server's PING (every 2 minutes) while a publish may be
        # mid-write: one writer at a time, or trio raises BusyResourceError.
        self._send_lock = trio.StrictFIFOLock()
        self._pongs = 0
        self._pong_seen = trio.Event()
        self._out: list[bytes] = []
        self.published = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str) -> Any:
        parts = urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 4222)
        async with stream, trio.open_nursery() as nursery:
            pub = cls(stream)
            connect = {"verbose": False, "pedantic": False, "name": LOADGEN_NATS_NAME}
            await stream.send_all(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
            nursery.start_soon(pub._read)
            try:
                await pub.flush()
                yield pub
            finally:
                nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        buf = b""
        while True:
            data = await self._stream.receive_some(65536)
            if not data:
                raise RuntimeError("loadgen: NATS closed the publisher's connection")
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                if line == b"PING":
                    await self._send(b"PONG\r\n")
                elif line == b"PONG":
                    self._pongs += 1
                    self._pong_seen.set()
                    self._pong_seen = trio.Event()
                elif line.startswith(b"-ERR"):
                    raise RuntimeError(f"loadgen: NATS said {line.decode(errors='replace')}")

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    def pub(self, subject: str, payload: bytes) -> None:
        self._out.append(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        self.published += 1

    async def send(self) -> None:
        if self._out:
            out, self._out = b"".join(self._out), []
            await self._send(out)

    async def flush(self) -> None:
        await self.send()
        target = self._pongs + 1
        await self._send(b"PING\r\n")
        while self._pongs < target:
            await self._pong_seen.wait()


LOADGEN_NATS_NAME = "chatwatch-loadgen"


def chunk_payload(conv: str, seq: int, text: str) -> bytes:
    return json.dumps(
        {
            "chunk_type": "token",
            "conv": conv,
            "seq": seq,
            "ts": time.monotonic_ns(),
            "text": text,
        },
        separators=(",", ":"),
    ).encode()


def final_payload(conv: str, seq: int) -> bytes:
    body = {"role": "assistant", "conv": conv, "seq": seq, "ts": time.monotonic_ns()}
    return json.dumps({**body, "final": True}, separators=(",", ":")).encode()


# -- /proc and the NATS monitor -------------------------------------------------------


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def rss_kb(pid: int | None) -> float:
    if not pid:
        return 0.0
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += float(line.split()[1])
    return total


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    if not pid:
        return 0.0
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields_ = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields_[11]) + int(fields_[12])) / TICK
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / TICK


class Phase:
    """CPU used by the server, nats-server, the loadgen and everything else, over a phase."""

    def __init__(self, server_pid: int | None, nats_pid: int | None) -> None:
        self._pids = {"server": server_pid, "nats": nats_pid, "loadgen": os.getpid()}
        self._start = self._sample()

    def _sample(self) -> dict[str, float]:
        now = {name: cpu_s(pid) for name, pid in self._pids.items()}
        return {**now, "machine": machine_busy_s(), "wall": time.monotonic()}

    def end(self) -> dict[str, Any]:
        end = self._sample()
        wall = max(end["wall"] - self._start["wall"], 1e-9)
        used = {n: end[n] - self._start[n] for n in self._pids}
        other = end["machine"] - self._start["machine"] - sum(used.values())
        return {
            "wall_s": round(wall, 3),
            **{n: {"util": round(used[n] / wall, 3)} for n in self._pids},
            "other_cpu_cores": round(max(other, 0.0) / wall, 3),
        }


async def http_get_json(url: str) -> Any:
    """GET a small JSON document (the NATS monitor) without blocking the trio loop."""
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    async with stream:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while data := await stream.receive_some(262144):
            chunks.append(data)
    return json.loads(b"".join(chunks).partition(b"\r\n\r\n")[2])


async def client_subscriptions(monitor_url: str) -> int:
    """Subscriptions held by every connection but the loadgen's publisher."""
    connz = await http_get_json(monitor_url + "/connz?subs=1&limit=100000")
    return sum(
        int(c.get("subscriptions", 0))
        for c in connz.get("connections") or []
        if c.get("name") != LOADGEN_NATS_NAME
    )


async def slow_consumers(monitor_url: str) -> int:
    return int((await http_get_json(monitor_url + "/varz")).get("slow_consumers", 0))


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


# -- a run ----------------------------------------------------------------------------


@dataclass
class Target:
    host: str
    port: int
    nats_url: str
    monitor_url: str
    server_pid: int | None
    nats_pid: int | None
    auth: dict[str, Any]


def plan(auth: dict[str, Any], sc: Scenario) -> list[WatchRequest]:
    """C conversations from the auth file (with their owner's token), W watchers each."""
    owned = [
        (cid, token)
        for token, entry in auth.items()
        if entry.get("bench_role") != "stranger"
        for cid in entry.get("conversations") or ()
    ]
    if len(owned) < sc.conversations:
        raise SystemExit(
            f"loadgen: the auth file has {len(owned)} conversations, {sc.conversations} needed"
        )
    return [
        WatchRequest(cid, token)
        for cid, token in owned[: sc.conversations]
        for _ in range(sc.watchers)
    ]


async def connect_all(
    target: Target, requests: list[WatchRequest], sc: Scenario, tally: Tally, nursery: trio.Nursery
) -> tuple[list[Watcher], float]:
    """Start every watcher (at most connect_concurrency connecting at once); wait for `:ok`."""
    watchers = [Watcher(r, sc.messages, tally) for r in requests]
    return watchers, await start_all(target, watchers, sc, nursery)


async def start_all(
    target: Target,
    watchers: list[Watcher],
    sc: Scenario,
    nursery: trio.Nursery,
    *,
    until_final: bool = False,
) -> float:
    """Run every watcher in `nursery`, at most connect_concurrency of them between
    connecting and `:ok` at once; seconds until each has `:ok` (or, with `until_final`,
    is settled: the final message, an error event, or the end of its stream)."""
    limiter = trio.CapacityLimiter(sc.connect_concurrency)
    started = time.monotonic_ns()

    async def one(w: Watcher) -> None:
        async with limiter:
            nursery.start_soon(w.run, target.host, target.port, started)
            await w.ok_event.wait()
        if until_final:
            await w.settled.wait()

    async with trio.open_nursery() as connecting:
        for w in watchers:
            connecting.start_soon(one, w)
    return (time.monotonic_ns() - started) / 1e9


async def publish_all(
    pub: Publisher,
    conversations: list[str],
    sc: Scenario,
    *,
    first_seq: int = 0,
    stop: int | None = None,
) -> None:
    """Chunks first_seq..stop-1 per conversation, interleaved, then (when stop is the
    scenario's end) one final message each; paced by rate."""
    stop = sc.messages if stop is None else stop
    text = "x" * sc.text_bytes
    started = trio.current_time()
    sent = 0
    for seq in range(first_seq, stop):
        for conv in conversations:
            pub.pub(f"chat.chunk.{conv}", chunk_payload(conv, seq, text))
            sent += 1
            if sc.rate > 0:
                await pub.send()
                await trio.sleep_until(started + sent / sc.rate)
            elif sent % 1000 == 0:
                await pub.send()
                await trio.lowlevel.checkpoint()
    if stop == sc.messages:
        for conv in conversations:
            pub.pub(f"chat.message.{conv}", final_payload(conv, sc.messages))
    await pub.flush()


async def wait_subs_gone(monitor_url: str, baseline: int) -> tuple[float | None, int]:
    """Until the server's subscriptions are back to `baseline`, those it held before any
    watcher came (with history on, chatwatch keeps one for its JetStream requests'
    replies); the time that took, and how many more than the baseline were left."""
    started = time.monotonic()
    left = 0
    with trio.move_on_after(30):
        # Another process's state: nothing to wait on but the monitor, polled.
        while True:
            left = await client_subscriptions(monitor_url) - baseline
            if left <= 0:
                return round((time.monotonic() - started) * 1000, 1), 0
            await trio.sleep(0.025)
    return None, left


def delivery_summary(
    watchers: list[Watcher], tally: Tally, expected_each: int, elapsed_s: float
) -> dict[str, Any]:
    unique = sum(len(w.seen) for w in watchers)
    expected = expected_each * len(watchers)
    lat = sorted(v / 1e6 for v in tally.latencies_ns)
    return {
        "expected": expected,
        "unique": unique,
        "missing": expected - unique,
        "duplicates": tally.duplicates,
        "out_of_order": tally.out_of_order,
        "misrouted": tally.misrouted,
        "bad_frames": tally.bad_frames,
        "final_before_chunks": tally.final_before_chunks,
        "error_events": len(tally.errors),
        "first_errors": tally.errors[:5],
        "comments": tally.comments,
        "events_per_s": round(unique / elapsed_s, 1) if elapsed_s > 0 else None,
        "elapsed_s": round(elapsed_s, 3),
        "latency_ms": {
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
            "max": lat[-1] if lat else None,
        },
    }


async def run_broadcast_like(target: Target, sc: Scenario) -> dict[str, Any]:
    """broadcast, paced, many, idle: connect everyone, (idle), publish, wait for the finals."""
    tally = Tally()
    requests = plan(target.auth, sc)
    conversations = list(dict.fromkeys(r.conversation for r in requests))
    result: dict[str, Any] = {"phases": {}}
    rss_before = rss_kb(target.server_pid)
    sc_before = await slow_consumers(target.monitor_url)
    subs_before = await client_subscriptions(target.monitor_url)
    async with Publisher.open(target.nats_url) as pub, trio.open_nursery() as nursery:
        phase = Phase(target.server_pid, target.nats_pid)
        with trio.move_on_after(sc.deadline_s) as connect_scope:
            watchers, t_all_ok = await connect_all(target, requests, sc, tally, nursery)
        result["phases"]["connect"] = phase.end()
        if connect_scope.cancelled_caught:
            nursery.cancel_scope.cancel()
            return {**result, "error": "not every watcher got :ok within the deadline"}
        statuses: dict[str, int] = {}
        for w in watchers:
            statuses[str(w.status)] = statuses.get(str(w.status), 0) + 1
        result["connect"] = {
            "t_all_ok_s": round(t_all_ok, 3),
            "statuses": statuses,
            "ttfb_ms_p50": statistics.median(w.ttfb_ns / 1e6 for w in watchers),
        }
        result["rss_kb"] = {"before": rss_before, "connected": rss_kb(target.server_pid)}
        result["cleanup"] = {"subs_connected": await client_subscriptions(target.monitor_url)}
        if sc.idle_s:
            phase = Phase(target.server_pid, target.nats_pid)
            await trio.sleep(sc.idle_s)
            result["phases"]["idle"] = phase.end()
            after_idle = rss_kb(target.server_pid)
            result["rss_kb"]["after_idle"] = after_idle
            result["idle"] = {
                "rss_kb_per_watcher": round((after_idle - rss_before) / len(watchers), 2)
            }
        phase = Phase(target.server_pid, target.nats_pid)
        started = time.monotonic()
        last_arrival = started
        with trio.move_on_after(sc.deadline_s) as delivery_scope:
            async with trio.open_nursery() as publishing:
                publishing.start_soon(publish_all, pub, conversations, sc)
                for w in watchers:
                    await w.final_event.wait()
            last_arrival = time.monotonic()
        result["phases"]["delivery"] = phase.end()
        result["rss_kb"]["delivered"] = rss_kb(target.server_pid)
        result["delivery"] = delivery_summary(
            watchers, tally, sc.messages + 1, last_arrival - started
        )
        if delivery_scope.cancelled_caught:
            result["delivery"]["timed_out"] = True
        nursery.cancel_scope.cancel()
    phase = Phase(target.server_pid, target.nats_pid)
    zero_ms, left = await wait_subs_gone(target.monitor_url, subs_before)
    result["phases"]["cleanup"] = phase.end()
    result["cleanup"].update(subs_zero_ms=zero_ms, subs_remaining=left)
    result["nats"] = {"slow_consumers": await slow_consumers(target.monitor_url) - sc_before}
    result["ok"] = (
        all(w.status == 200 for w in watchers)
        and result["delivery"]["missing"] == 0
        and tally.duplicates == tally.out_of_order == tally.misrouted == tally.bad_frames == 0
        and not tally.errors  # e.g. a late join whose replay failed (history on)
        and left == 0
    )
    return result


async def run_churn(target: Target, sc: Scenario) -> dict[str, Any]:
    """Waves of watchers under a steady publish rate, aborted early or dropped abruptly."""
    tally = Tally()
    requests = plan(target.auth, sc)
    conversations = list(dict.fromkeys(r.conversation for r in requests))
    published: dict[str, list[tuple[int, int]]] = {c: [] for c in conversations}  # (seq, ts)
    rng = random.Random(7)
    finished: list[Watcher] = []
    aborted_early = 0
    result: dict[str, Any] = {"phases": {}}
    sc_before = await slow_consumers(target.monitor_url)
    subs_before = await client_subscriptions(target.monitor_url)

    async def publisher(pub: Publisher) -> None:
        text = "x" * sc.text_bytes
        seqs = dict.fromkeys(conversations, 0)
        started = trio.current_time()
        sent = 0
        while True:
            conv = conversations[sent % len(conversations)]
            seq = seqs[conv]
            seqs[conv] = seq + 1
            payload = chunk_payload(conv, seq, text)
            published[conv].append((seq, time.monotonic_ns()))
            pub.pub(f"chat.chunk.{conv}", payload)
            sent += 1
            if sent % 50 == 0:
                await pub.send()
            await trio.sleep_until(started + sent / sc.rate)

    async def one(w: Watcher, nursery: trio.Nursery) -> None:
        nonlocal aborted_early
        nursery.start_soon(w.run, target.host, target.port, time.monotonic_ns())
        if rng.random() < sc.churn_abort_fraction:
            await trio.sleep(rng.random() * 0.002)
            aborted_early += 1
            w.abort(reset=rng.random() < 0.5)
            return
        with trio.move_on_after(30):
            await w.ok_event.wait()
        await trio.sleep(sc.churn_receive_s)
        w.closed_ns = time.monotonic_ns()
        w.abort(reset=rng.random() < 0.5)
        finished.append(w)

    phase = Phase(target.server_pid, target.nats_pid)
    async with Publisher.open(target.nats_url) as pub, trio.open_nursery() as outer:
        outer.start_soon(publisher, pub)
        for _wave in range(sc.churn_waves):
            limiter = trio.CapacityLimiter(sc.connect_concurrency)
            async with trio.open_nursery() as streams:
                async with trio.open_nursery() as wave:

                    async def limited(
                        w: Watcher,
                        streams: trio.Nursery = streams,
                        limiter: trio.CapacityLimiter = limiter,
                    ) -> None:
                        async with limiter:
                            await one(w, streams)

                    for r in requests:
                        wave.start_soon(limited, Watcher(r, 0, tally))
                streams.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    result["phases"]["delivery"] = phase.end()
    missing = silent = owed_total = 0
    silent_detail: list[dict[str, Any]] = []
    gap_detail: list[dict[str, Any]] = []
    for w in finished:
        if not w.ok_ns:
            continue
        owed = {
            seq
            for seq, ts in published[w.req.conversation]
            if ts > w.ok_ns and (seq <= w.highest or ts <= w.closed_ns - 1_000_000_000)
        }
        owed_total += len(owed)
        lost = len(owed - w.seen)
        missing += lost
        if lost and lost < len(owed) and len(gap_detail) < 10:
            # a watcher that got some of what it was owed: where the holes are
            sent = dict(published[w.req.conversation])
            holes = sorted(owed - w.seen)
            gap_detail.append(
                {
                    "holes": holes[:8],
                    "holes_ts_ms": [round((sent[s] - w.ok_ns) / 1e6, 1) for s in holes[:8]],
                    "seen_range": [min(w.seen), w.highest],
                    "seen": len(w.seen),
                    "open_ms": round((w.closed_ns - w.ok_ns) / 1e6, 1),
                }
            )
        if owed and lost == len(owed):
            silent += 1
            if len(silent_detail) < 20:
                # what a silent watcher saw, relative to its `:ok` (ms): to tell a late
                # delivery from a lost one
                sent = dict(published[w.req.conversation])
                silent_detail.append(
                    {
                        "owed": sorted(owed)[:5],
                        "owed_ts_ms": [
                            round((sent[s] - w.ok_ns) / 1e6, 1) for s in sorted(owed)[:5]
                        ],
                        "open_ms": round((w.closed_ns - w.ok_ns) / 1e6, 1),
                        "seen": len(w.seen),
                        "highest": w.highest,
                    }
                )
    zero_ms, left = await wait_subs_gone(target.monitor_url, subs_before)
    result["cleanup"] = {"subs_zero_ms": zero_ms, "subs_remaining": left}
    result["delivery"] = {
        "watchers": len(finished),
        "aborted_early": aborted_early,
        # dropped after 30 s without `:ok` (each such watcher holds its wave that long)
        "never_ok": sum(1 for w in finished if not w.ok_ns),
        "owed": owed_total,
        "missing": missing,
        "silent_watchers": silent,
        "silent_detail": silent_detail,
        "gap_detail": gap_detail,
        "duplicates": tally.duplicates,
        "out_of_order": tally.out_of_order,
        "misrouted": tally.misrouted,
        "bad_frames": tally.bad_frames,
    }
    result["nats"] = {"slow_consumers": await slow_consumers(target.monitor_url) - sc_before}
    result["ok"] = missing == silent == left == tally.duplicates == tally.out_of_order == 0
    return result


async def stored_events(monitor_url: str) -> int:
    """Messages held by JetStream on the nats-server (0 where it has none)."""
    return int((await http_get_json(monitor_url + "/jsz")).get("messages", 0))


async def wait_stored(monitor_url: str, count: int, deadline_s: float) -> bool:
    """Until JetStream holds `count` messages: a resume must find everything it is
    behind in the stream, not still on its way to it (a core publish is stored after
    the PONG that acknowledges it)."""
    with trio.move_on_after(deadline_s):
        # Another process's state: nothing to wait on but the monitor, polled.
        while True:
            if await stored_events(monitor_url) >= count:
                return True
            await trio.sleep(0.01)
    return False


async def run_resume(target: Target, sc: Scenario) -> dict[str, Any]:
    """resume: every watcher live for the first `resume_after` chunks, all dropped at
    once (RST), the rest published and stored while they are away, then all reconnect
    at once with the last id each received; catch-up time is from the reconnect start
    until each has the final message (limited only by connect_concurrency between
    connect and `:ok`, as every other scenario's connect is)."""
    if not 0 < sc.resume_after <= sc.messages:
        raise SystemExit(f"loadgen: resume_after must be in 1..messages ({sc.messages})")
    tally = Tally()
    requests = plan(target.auth, sc)
    conversations = list(dict.fromkeys(r.conversation for r in requests))
    behind = sc.messages + 1 - sc.resume_after
    result: dict[str, Any] = {"phases": {}}
    sc_before = await slow_consumers(target.monitor_url)
    subs_before = await client_subscriptions(target.monitor_url)
    async with Publisher.open(target.nats_url) as pub, trio.open_nursery() as nursery:
        phase = Phase(target.server_pid, target.nats_pid)
        with trio.move_on_after(sc.deadline_s) as connect_scope:
            watchers, t_all_ok = await connect_all(target, requests, sc, tally, nursery)
        result["phases"]["connect"] = phase.end()
        if connect_scope.cancelled_caught or any(w.status != 200 for w in watchers):
            nursery.cancel_scope.cancel()
            return {**result, "error": "not every watcher got 200 and :ok within the deadline"}
        result["connect"] = {"t_all_ok_s": round(t_all_ok, 3)}
        phase = Phase(target.server_pid, target.nats_pid)
        with trio.move_on_after(sc.deadline_s) as live_scope:
            await publish_all(pub, conversations, sc, stop=sc.resume_after)
            for w in watchers:
                await w.wait_for_seq(sc.resume_after - 1)
        result["phases"]["live"] = phase.end()
        if live_scope.cancelled_caught:
            nursery.cancel_scope.cancel()
            return {**result, "error": "the live events did not all arrive within the deadline"}
        if any(w.last_id is None for w in watchers):
            nursery.cancel_scope.cancel()
            return {
                **result,
                "error": "the server sent no event ids: resume needs history on"
                " (chatwatch --history on, nats-server with JetStream: run.py --jetstream)",
            }
        for w in watchers:
            w.abort(reset=True)
        await publish_all(pub, conversations, sc, first_seq=sc.resume_after)
        if not await wait_stored(
            target.monitor_url, (sc.messages + 1) * len(conversations), sc.deadline_s
        ):
            nursery.cancel_scope.cancel()
            return {**result, "error": "JetStream did not store every event within the deadline"}
        resumed = [w.resumed() for w in watchers]
        phase = Phase(target.server_pid, target.nats_pid)
        started = time.monotonic_ns()
        with trio.move_on_after(sc.deadline_s) as catchup_scope:
            await start_all(target, resumed, sc, nursery, until_final=True)
        total_s = (time.monotonic_ns() - started) / 1e9
        result["phases"]["delivery"] = phase.end()
        result["rss_kb"] = {"caught_up": rss_kb(target.server_pid)}
        # Percentiles over the watchers that caught up; `caught_up` says how many did.
        catchup = sorted((w.final_ns - started) / 1e6 for w in resumed if w.final_ns)
        everyone = len(catchup) == len(resumed)
        result["resume"] = {
            "behind": behind,
            "watchers": len(resumed),
            "caught_up": len(catchup),
            "catchup_ms": {
                "p50": percentile(catchup, 50),
                "p99": percentile(catchup, 99),
                "max": catchup[-1] if catchup else None,
            },
            "all_caught_up_s": round(total_s, 3) if everyone else None,
            "settled_s": round(total_s, 3),
            "replayed_events_per_s": round(len(catchup) * behind / total_s, 1),
        }
        result["delivery"] = delivery_summary(resumed, tally, sc.messages + 1, total_s)
        if catchup_scope.cancelled_caught:
            result["delivery"]["timed_out"] = True
        nursery.cancel_scope.cancel()
    phase = Phase(target.server_pid, target.nats_pid)
    zero_ms, left = await wait_subs_gone(target.monitor_url, subs_before)
    result["phases"]["cleanup"] = phase.end()
    result["cleanup"] = {"subs_zero_ms": zero_ms, "subs_remaining": left}
    result["nats"] = {"slow_consumers": await slow_consumers(target.monitor_url) - sc_before}
    result["ok"] = (
        all(w.status == 200 for w in resumed)
        and result["delivery"]["missing"] == 0
        and tally.duplicates == tally.out_of_order == tally.misrouted == tally.bad_frames == 0
        and not tally.errors
        and left == 0
    )
    return result


async def run(target: Target, name: str, sc: Scenario) -> dict[str, Any]:
    if sc.resume_after:
        body = await run_resume(target, sc)
    elif sc.churn_waves:
        body = await run_churn(target, sc)
    else:
        body = await run_broadcast_like(target, sc)
    other = max(
        (p.get("other_cpu_cores", 0.0) for p in body.get("phases", {}).values()), default=0.0
    )
    loadgen_util = body.get("phases", {}).get("delivery", {}).get("loadgen", {}).get("util", 0.0)
    return {
        "scenario": name,
        "options": asdict(sc),
        **body,
        "max_other_cpu_cores": other,
        "loadgen_bound": loadgen_util >= 0.95,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--nats-url", required=True)
    ap.add_argument("--monitor-url", required=True)
    ap.add_argument("--auth-file", type=Path, required=True)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--nats-pid", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    sc = with_overrides(SCENARIOS[args.scenario], args.set)
    base = urlsplit(args.base_url)
    target = Target(
        host=base.hostname or "127.0.0.1",
        port=base.port or 80,
        nats_url=args.nats_url,
        monitor_url=args.monitor_url.rstrip("/"),
        server_pid=args.server_pid,
        nats_pid=args.nats_pid,
        auth=json.loads(args.auth_file.read_text()),
    )
    try:
        result = trio.run(run, target, args.scenario, sc)
    except (OSError, RuntimeError) as exc:
        result = {"scenario": args.scenario, "options": asdict(sc), "error": str(exc)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    d = result.get("delivery", {})
    print(
        f"loadgen {args.scenario}: ok={result.get('ok')} error={result.get('error')}"
        f" events/s={d.get('events_per_s')} missing={d.get('missing')}"
        f" dup={d.get('duplicates')} ooo={d.get('out_of_order')}",
        file=sys.stderr,
    )
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
