"""The test helpers themselves, and the suite's own rules: a service that stops
answering fails a test instead of hanging the run, blocking probes stay off the trio
thread, leaks are errors, test modules do not import each other."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tests import rawnats, served as served_module, sseclient
from tests.natsproc import NatsProcess
from tests.polling import wait_until
from tests.ports import closed_port, free_port
from tests.procfs import children_of, is_running, rss_kib

TESTS = Path(__file__).resolve().parent


@pytest.fixture
async def silent_port(nursery: trio.Nursery) -> int:
    """A port that accepts connections and then never says anything (until the test's
    nursery is cancelled at teardown, which closes them)."""

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_a_silent_server_fails_the_request_instead_of_hanging(
    autojump_clock: trio.testing.MockClock, silent_port: int
) -> None:
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await sseclient.request(silent_port, "/")
    assert trio.current_time() - started == pytest.approx(sseclient.READ_LIMIT)


async def test_a_silent_stream_fails_the_read_instead_of_hanging(
    autojump_clock: trio.testing.MockClock, silent_port: int
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", silent_port)
    response = sseclient.Response(stream)
    with pytest.raises(trio.TooSlowError):
        await response.next_frame()
    with pytest.raises(trio.TooSlowError):
        await response.frames_until(count=1)
    with pytest.raises(trio.TooSlowError):
        await response.read_body(limit=1)
    await response.aclose()


async def test_a_silent_nats_server_fails_the_connect_instead_of_hanging(
    autojump_clock: trio.testing.MockClock, silent_port: int
) -> None:
    with pytest.raises(trio.TooSlowError):
        await rawnats.RawNats.connect(silent_port)


async def test_the_monitor_refuses_to_block_the_trio_thread(nats: NatsProcess) -> None:
    with pytest.raises(RuntimeError, match="blocks"):
        nats.monitor("/varz")
    assert (await nats.monitor_async("/varz"))["port"] == nats.client_port
    assert isinstance(await nats.chat_subscriptions_async(), list)


def test_a_server_left_paused_is_restarted_for_the_next_test(nats_server: NatsProcess) -> None:
    # A test that fails between pausing the session's server and restarting it must not
    # leave it frozen: every later test would time out on it (CI once failed 115 tests
    # that way, from one failure in test_bus).
    nats_server.ensure_running()
    nats_server.pause()
    assert not nats_server._healthy()
    nats_server.ensure_running()
    assert not nats_server.paused
    assert nats_server._healthy()
    assert nats_server.monitor("/varz")["port"] == nats_server.client_port


async def test_wait_until_runs_its_predicate_off_the_trio_thread() -> None:
    on_trio_thread: list[bool] = []

    def predicate() -> bool:
        on_trio_thread.append(trio.lowlevel.in_trio_run())
        return len(on_trio_thread) >= 2

    await wait_until(predicate)
    assert on_trio_thread == [False, False]


async def test_a_closed_port_refuses_connections_while_held() -> None:
    with closed_port() as port, pytest.raises(OSError, match="connect"), trio.fail_after(5):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_procfs_sees_a_child_its_memory_and_its_end() -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert proc.pid in children_of(os.getpid())
        assert is_running(proc.pid)
        assert rss_kib(proc.pid) > 0
    finally:
        assert proc.stdin is not None
        await proc.stdin.aclose()  # EOF: it exits
        with trio.fail_after(15):
            await proc.wait()
    assert not is_running(proc.pid)
    assert proc.pid not in children_of(os.getpid())


def test_a_leaked_resource_is_an_error() -> None:
    """pyproject.toml once ignored ResourceWarning while other warnings were errors."""
    with pytest.raises(ResourceWarning):
        warnings.warn("unclosed", ResourceWarning, stacklevel=1)


def test_no_test_module_imports_another() -> None:
    """Shared steps live in helper modules (streams, ports, procfs, ...), not in a test
    module that another one imports (which also collects nothing twice by accident)."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[-1].startswith("test_"):
                    offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}: {name}")
    assert offenders == [], "import the helper modules instead:\n" + "\n".join(offenders)


async def test_served_starts_again_on_another_port_when_its_port_was_taken(
    nats: NatsProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free-port race, lost on purpose: the first port is taken by the time the
    service binds it."""
    with closed_port() as taken:
        ports = iter([taken, free_port()])
        monkeypatch.setattr(served_module, "free_port", lambda: next(ports))
        async with served_module.served(nats, tmp_path, conversations=1) as srv:
            assert srv.port != taken
            status, _, _ = await sseclient.get(srv.port, "/healthz")
            assert status == 200
