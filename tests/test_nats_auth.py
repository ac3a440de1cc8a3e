"""A NATS connection closed for good (credentials revoked) ends the process loudly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from app.embedded import nats_server_binary
from tests.polling import wait_until
from tests.served import free_port


def write_conf(path: Path, port: int, password: str) -> None:
    path.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'authorization {{ users = [ {{ user: "chatwatch", password: "{password}" }} ] }}\n'
    )


async def test_revoked_credentials_make_the_process_exit_non_zero(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "nats.conf"
    write_conf(conf, port, "s3cret")
    server = await trio.lowlevel.open_process(
        [nats_server_binary(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "service.log"
    try:
        with log.open("wb") as err:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "app",
                    "serve",
                    "--bind",
                    f"127.0.0.1:{free_port()}",
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
                write_conf(conf, port, "changed")
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
