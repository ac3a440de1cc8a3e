"""The benchmark's Node peer: set up only where `node` exists, and answering the contract.

A peer that answers wrongly (a 200 for a stranger, a frame the load generator counts
as bad) would make the comparison table meaningless, and `nox -s bench` must work on a
machine without Node, so both the setup and the peer are pinned here. The setup tests
use stand-in `node`/`npm` scripts; the peer test runs the real one against the real
nats-server, and is skipped where Node or its one package cannot be had.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.bench import run
from tests.natsproc import NatsProcess
from tests.polling import wait_until
from tests.ports import free_port
from tests.rawnats import RawNats
from tests.sseclient import Response, request

PEER_EXIT_LIMIT = 15.0


def fake_tools(bin_dir: Path, npm_body: str) -> None:
    """`node` and `npm` scripts on a PATH of their own; npm logs each call to npm.log."""
    bin_dir.mkdir()
    (bin_dir / "node").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "npm").write_text(f'#!/bin/sh\necho "$@" >> "{bin_dir}/npm.log"\n{npm_body}\n')
    for tool in ("node", "npm"):
        (bin_dir / tool).chmod(0o755)


@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache" / "node_peer"
    monkeypatch.setattr(run, "NODE_CACHE", cache)
    return cache


def test_without_node_the_peer_is_skipped_with_one_line(
    tmp_path: Path,
    node_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "out"
    out.mkdir()
    code = run.main(["--peer", "node", "--scenarios", "many", "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().err == "bench: node peer skipped: no node or npm on PATH\n"
    assert list(out.iterdir()) == []  # report.py shows the peer as "n/a"
    assert not node_cache.exists()


def test_a_failed_install_is_one_line_and_exit_1(
    tmp_path: Path,
    node_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bin_dir = tmp_path / "bin"
    fake_tools(bin_dir, 'echo "npm error 404 Not Found - nats" >&2\nexit 1')
    monkeypatch.setenv("PATH", str(bin_dir))
    code = run.main(["--peer", "node", "--scenarios", "many", "--out", str(tmp_path)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"bench: node peer: npm ci in {node_cache} failed: npm error 404 Not Found - nats\n"
    )
    assert not (node_cache / "installed.stamp").exists()  # the next run tries again


def test_the_install_runs_once_per_lock_file(
    tmp_path: Path, node_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    fake_tools(bin_dir, "exit 0")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert run.prepare_node_peer()
    assert run.prepare_node_peer()
    calls = (bin_dir / "npm.log").read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith("ci ")
    assert (node_cache / "package-lock.json").read_bytes() == (
        run.NODE_PEER / "package-lock.json"
    ).read_bytes()
    # A changed lock file (a new nats.js pin) installs again.
    (node_cache / "installed.stamp").write_bytes(b"an older install")
    assert run.prepare_node_peer()
    assert len((bin_dir / "npm.log").read_text().splitlines()) == 2


# -- the real peer ---------------------------------------------------------------------


def installed_peer() -> None:
    """Install the peer's package (npm's cache makes repeats quick), or skip the test."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("no node or npm on PATH")
    try:
        run.prepare_node_peer()
    except RuntimeError as exc:
        pytest.skip(f"cannot install the Node peer's package: {exc}")


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@asynccontextmanager
async def node_peer(nats: NatsProcess, auth_file: Path, log: Path) -> AsyncGenerator[int, None]:
    """The peer started as run.py starts it; stopped with SIGTERM, which it must obey."""
    port = free_port()
    cmd = run.PEERS["node"].format(
        port=port, nats_url=nats.url, auth_file=auth_file, bench=run.BENCH
    )
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(
            ["bash", "-c", f"exec {cmd}"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await wait_until(lambda: proc.poll() is not None or answers(port))
        if proc.returncode is not None:
            raise AssertionError(f"the peer exited at start: {await trio.Path(log).read_text()}")
        yield port
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(PEER_EXIT_LIMIT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def status_of(port: int, path: str, token: str | None = None) -> int:
    response = await request(port, path, token=token)
    await response.aclose()
    return response.status


def sse_data(frame: bytes) -> Any:
    assert frame.startswith(b"data: "), frame
    return json.loads(frame[len(b"data: ") :])


async def check_stream(watcher: Response, nats: NatsProcess, cid: str) -> None:
    """`:ok`, then one frame per message of the conversation, in the contract's format."""
    assert watcher.status == 200
    assert watcher.headers["content-type"] == "text/event-stream"
    assert await watcher.next_frame() == b":ok"
    pub = await RawNats.connect(nats.client_port)
    try:
        await pub.publish_many(
            [
                (f"chat.chunk.{cid}", b'{"chunk_type":"token","seq":1,"text":"a\\nb"}'),
                (f"chat.chunk.{cid}", b'{"seq":2}'),
                (f"chat.chunk.{cid}", b"not json\n"),
                (f"chat.chunk.{uuid.uuid4()}", b'{"chunk_type":"token","seq":99}'),
                (f"chat.message.{cid}", b'{"role":"assistant",\n"seq":3}'),
            ]
        )
    finally:
        await pub.aclose()
    frames = [sse_data(f) for f in await watcher.frames_until(count=4)]
    assert frames == [
        {"event": "token", "data": {"chunk_type": "token", "seq": 1, "text": "a\nb"}},
        {"event": "chunk", "data": {"seq": 2}},
        {"event": "chunk", "data": "not json\n"},
        {"event": "message", "data": {"role": "assistant", "seq": 3}},
    ]


async def test_the_node_peer_answers_the_contract(tmp_path: Path, nats: NatsProcess) -> None:
    await trio.to_thread.run_sync(installed_peer)
    auth_file = tmp_path / "auth.json"
    run.write_auth(auth_file, 1)
    auth = json.loads(auth_file.read_text())
    (owner,) = (t for t, e in auth.items() if e.get("bench_role") != "stranger")
    (stranger,) = (t for t, e in auth.items() if e.get("bench_role") == "stranger")
    cid = auth[owner]["conversations"][0]
    path = f"/api/ai/conversations/{cid}/watch"
    async with node_peer(nats, auth_file, tmp_path / "peer.log") as port:
        assert await status_of(port, path) == 401
        assert await status_of(port, path, token="not-a-token") == 401
        assert await status_of(port, path, token=stranger) == 404
        assert await status_of(port, "/api/ai/conversations/not-a-uuid/watch", token=owner) == 404
        by_cookie = await request(port, path, cookie=owner)
        try:
            assert by_cookie.status == 200
            assert await by_cookie.next_frame() == b":ok"
        finally:
            await by_cookie.aclose()

        # Conversation ids are matched case-insensitively, as chatwatch does.
        watcher = await request(port, f"/api/ai/conversations/{cid.upper()}/watch", token=owner)
        try:
            await check_stream(watcher, nats, cid)
        finally:
            await watcher.aclose()
        # The watcher's subscription goes with it (the loadgen's cleanup figure).
        await wait_until(lambda: not any(cid in s for s in nats.chat_subscriptions()))
