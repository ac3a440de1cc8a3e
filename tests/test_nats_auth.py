"""A NATS connection closed for good (credentials revoked) ends the process loudly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from app.embedded import nats_server_binary
from tests.polling import wait_until


def write_conf(path: Path, password: str) -> None:
    path.write_text(
        f'authorization {{ users = [ {{ user: "chatwatch", password: "{password}" }} ] }}\n'
    )


def reported_port(ports_dir: Path) -> int | None:
    """The client port nats-server wrote to its ports file, once it has."""
    for ports_file in ports_dir.glob("*.ports"):
        try:
            return int(json.loads(ports_file.read_text())["nats"][0].rsplit(":", 1)[1])
        except (json.JSONDecodeError, KeyError, IndexError):
            return None  # still being written
    return None


async def test_revoked_credentials_make_the_process_exit_non_zero(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    write_conf(conf, "s3cret")
    ports_dir = tmp_path / "ports"
    ports_dir.mkdir()
    # Port -1: the server picks a free port itself and reports it (no free-port race).
    # Command-line flags win over the file, also on reload.
    server = await trio.lowlevel.open_process(
        [
            nats_server_binary(),
            "-c",
            str(conf),
            "-a",
            "127.0.0.1",
            "-p",
            "-1",
            "--ports_file_dir",
            str(ports_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "service.log"
    try:
        await wait_until(lambda: reported_port(ports_dir) is not None, limit=10)
        port = reported_port(ports_dir)
        with log.open("wb") as err:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "app",
                    "serve",
                    "--bind",
                    "127.0.0.1:0",  # never connected to
                    "--nats-url",
                    f"nats://chatwatch:s3cret@127.0.0.1:{port}",
                    "--database-url",
                    f"sqlite:///{tmp_path / 'cw.db'}",
                ],
                stderr=err,
                env={**os.environ},
            )
            try:
                await wait_until(lambda: b"NATS connected" in log.read_bytes(), limit=15)
                write_conf(conf, "changed")
                server.send_signal(signal.SIGHUP)  # reload: our user is gone
                with trio.fail_after(20):
                    code = await proc.wait()
                assert code == 3
                assert "closed for good" in log.read_text()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        server.kill()
        await server.wait()
