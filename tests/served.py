"""`python -m app serve` in a subprocess, for tests that measure or signal the process."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from app.store import SQLiteStore
from tests.natsproc import NatsProcess
from tests.polling import poll_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, limit: float = 15.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on `port` (another process)."""

    async def accepts() -> bool:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await stream.aclose()
        return True

    await poll_until(accepts, limit)


@dataclass
class Served:
    port: int
    proc: trio.Process
    token: str
    cids: list[str] = field(default_factory=list)
    log: Path | None = None


@asynccontextmanager
async def served(
    nats: NatsProcess,
    tmp_path: Path,
    *args: str,
    conversations: int = 4,
    db_in_env: bool = False,
    host: str = "127.0.0.1",
) -> AsyncGenerator[Served, None]:
    """Seed a store, start the service on a free port, stop it (SIGTERM) on exit.

    With `db_in_env` the database URL goes in CHATWATCH_DATABASE_URL instead of the
    command line. The service's stderr goes to ``tmp_path / "service.log"``.
    """
    db = tmp_path / "cw.db"
    store = SQLiteStore(db)
    user = await store.add_user("u")
    token = await store.create_session(user)
    cids = [await store.create_conversation(user) for _ in range(conversations)]
    await store.aclose()
    port = free_port()
    db_url = f"sqlite:///{db}"
    env = {**os.environ}
    command = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--bind",
        f"{host}:{port}",
        "--nats-url",
        nats.url,
        "--max-watchers-per-session",
        "1000",
        "--log-level",
        "info",
    ]
    if "--history" not in args:
        # Most tests pin the core-NATS stream; history tests pass --history on.
        command += ["--history", "off"]
    if db_in_env:
        env["CHATWATCH_DATABASE_URL"] = db_url
    else:
        command += ["--database-url", db_url]
    log = tmp_path / "service.log"
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process([*command, *args], env=env, stderr=err)
        try:
            await wait_listening(port, host=host)
            yield Served(port, proc, token, cids, log)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
