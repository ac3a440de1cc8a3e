"""chatwatch instances as subprocesses, for the chaos and cluster runs: start, kill -9,
SIGTERM, and wait until one is ready (with history on)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import trio

from tests import sseclient

ROOT = Path(__file__).resolve().parent.parent


class Instance:
    def __init__(self, index: int, port: int, cmd: list[str], log: Path) -> None:
        self.index = index
        self.port = port
        self.cmd = cmd
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, limit: float = 20.0) -> int | None:
        """SIGTERM, and its exit code (None: it had to be killed, or never ran).
        Blocking: call it through a worker thread from trio."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    async def ready(self, limit: float = 45.0, history: bool = True) -> bool:
        """Whether /readyz says 200 (and history on, if asked) within `limit` seconds."""
        with trio.move_on_after(limit):
            while True:
                try:
                    with trio.fail_after(2):
                        status, _h, body = await sseclient.get(self.port, "/readyz")
                    if status == 200 and (not history or json.loads(body).get("history")):
                        return True
                except (OSError, EOFError, ValueError, trio.TooSlowError):
                    pass
                await trio.sleep(0.05)
        return False
