"""chatwatch instances as subprocesses, for the chaos and cluster runs: start, kill -9,
SIGTERM, and wait until one is ready (with history on)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from tests import sseclient
from tests.polling import poll_until

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

        async def answers() -> bool:
            try:
                with trio.fail_after(2):
                    status, _h, body = await sseclient.get(self.port, "/readyz")
            except (OSError, EOFError, trio.TooSlowError):
                return False
            return status == 200 and (not history or json.loads(body).get("history") is True)

        try:
            await poll_until(answers, limit)
        except trio.TooSlowError:
            return False
        return True


class Viewer(Protocol):
    numbers: list[int]  # the event numbers a client has received, in order


def flowing(clients: Sequence[Viewer], more: int) -> Callable[[], bool]:
    """A condition: every client has received `more` events beyond what it has now
    (traffic is flowing everywhere: what a phase waits for instead of a fixed time)."""
    marks = [len(c.numbers) + more for c in clients]
    return lambda: all(len(c.numbers) >= m for c, m in zip(clients, marks, strict=True))


def grown(count: Callable[[], int], more: int) -> Callable[[], bool]:
    """A condition: `count()` has grown by `more` from now (events published while a
    part is down, for instance)."""
    target = count() + more
    return lambda: count() >= target
