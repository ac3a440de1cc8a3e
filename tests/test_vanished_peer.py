"""A client that vanishes without FIN or RST (its link goes down) is noticed and its
stream, watcher and NATS subscription are gone within keepalive + write timeout.

The client runs in a network namespace this test creates (veth pair, addresses
10.213.x.0/30 that exist only on this machine, inside the test's own namespace), so
that its side of the link can be taken down. Needs root (CAP_NET_ADMIN) and `ip`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.conftest import watch_path
from tests.natsproc import NatsProcess
from tests.polling import poll_until, wait_until
from tests.served import served
from tests.streams import has_metric

CLIENT = """
import socket, sys
host, port, path, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port))
s.sendall(("GET %s HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer %s\\r\\n\\r\\n"
           % (path, token)).encode())
data = b""
while b":ok" not in data:
    data += s.recv(65536)
print("OK", flush=True)
sys.stdin.read()  # then never read the socket again
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, veth inside it, host address of our side)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (`ip`) for a network namespace")
    tag = f"cw{os.getpid() % 100000}"
    ns, outside, inside = f"{tag}ns", f"{tag}a", f"{tag}b"
    net = 1 + os.getpid() % 250
    host, peer = f"10.213.{net}.1", f"10.213.{net}.2"
    ip("netns", "add", ns)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", ns)
        ip("addr", "add", f"{host}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{peer}/30", "dev", inside)
        ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
        yield ns, inside, host
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def test_vanished_client_is_gone_within_keepalive_plus_write_timeout(
    nats: NatsProcess, tmp_path: Path, netns: tuple[str, str, str]
) -> None:
    ns, inside, host = netns
    async with served(
        nats, tmp_path, "--keepalive", "0.5", "--write-timeout", "2", host=host
    ) as srv:
        client = await trio.lowlevel.open_process(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-c",
                CLIENT,
                host,
                str(srv.port),
                watch_path(srv.cids[0]),
                srv.token,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert client.stdout is not None
            with trio.fail_after(10):
                assert (await client.stdout.receive_some(16)).startswith(b"OK")
            assert await nats.chat_subscriptions_async() == [f"chat.*.{srv.cids[0]}"]
            # The client's link goes down: no FIN, no RST, nothing ever again.
            await trio.to_thread.run_sync(
                ip, "netns", "exec", ns, "ip", "link", "set", inside, "down"
            )
            # keepalive + write timeout + slack for a loaded machine, still well below the
            # 30 s before TCP keepalive would notice (so this is the service's doing).
            await poll_until(
                lambda: has_metric(srv.port, "chatwatch_watchers 0.0", host), limit=0.5 + 2 + 15
            )
            await wait_until(lambda: nats.chat_subscriptions() == [])
        finally:
            client.kill()
            await client.wait()
