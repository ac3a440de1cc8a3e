"""`python -m app serve` in a subprocess, for tests that measure or signal the process."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from app.store import SQLiteStore
from tests import sseclient
from tests.natsproc import NatsProcess
from tests.polling import poll_until
from tests.ports import free_port

# A port found free can be taken by another process before the service binds it: then
# the service exits with "address in use" and is started again on another port.
PORT_ATTEMPTS = 3


async def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on `port` now."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_listening(port: int, limit: float = 15.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on `port` (another process)."""
    await poll_until(lambda: accepts(port, host), limit)


async def wait_serving(proc: trio.Process, port: int, host: str, limit: float = 15.0) -> bool:
    """Wait until `proc` accepts connections on `port`: True, or False if it exited."""

    async def settled() -> bool:
        return proc.returncode is not None or await accepts(port, host)

    await poll_until(settled, limit)
    return proc.returncode is None


async def wait_ready(port: int, host: str, limit: float = 15.0) -> None:
    """Until /readyz answers 200 (NATS connected, store answering) three times in a row:
    a stream opened before the service's NATS connection is up starts with "NATS not
    available" instead of `:ok` (a loaded machine made tests flaky that way); in a row,
    so that with `--workers` more than one worker has most likely answered."""
    streak = 0

    async def ready() -> bool:
        nonlocal streak
        try:
            with trio.fail_after(5):
                status = (await sseclient.get(port, "/readyz", host=host))[0]
        except (OSError, trio.TooSlowError):
            status = 0
        streak = streak + 1 if status == 200 else 0
        return streak >= 3

    await poll_until(ready, limit)


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
    db_url = f"sqlite:///{db}"
    env = {**os.environ}
    command = [
        sys.executable,
        "-m",
        "app",
        "serve",
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
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()  # as late as possible: see PORT_ATTEMPTS
        with log.open("wb") as err:
            proc = await trio.lowlevel.open_process(
                [*command, "--bind", f"{host}:{port}", *args], env=env, stderr=err
            )
        try:
            if await wait_serving(proc, port, host):
                if nats._proc is not None and not nats.paused:
                    await wait_ready(port, host)
                yield Served(port, proc, token, cids, log)
                return
            if attempt == PORT_ATTEMPTS or "in use" not in log.read_text().lower():
                raise RuntimeError(f"the service exited with {proc.returncode}:\n{log.read_text()}")
        finally:
            await stop(proc)


async def stop(proc: trio.Process) -> None:
    """SIGTERM, then SIGKILL if it is still there after 5 s; reaped either way."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
