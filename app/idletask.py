"""hypercorn's per-connection idle timer without a lock or a start handshake.

hypercorn's trio worker gives every connection a keep-alive timer, a task that closes
the connection after ``keep_alive_timeout`` while it is idle: `TrioSingleTask`,
started when the connection opens and stopped when a request arrives. Each
``restart`` and ``stop`` takes a `trio.Lock` (a scheduler pass each) and ``restart``
starts the task with ``nursery.start`` (the caller waits for the task's first step):
measured with tests/bench/connect_profile.py, about five of a connect's twenty task
steps. `IdleTask` does the same job synchronously: the cancel scope is made before
the task runs, the task is spawned with ``start_soon``, and ``stop`` cancels the
scope whether or not the task has run yet (a task that starts in a cancelled scope
ends at its first checkpoint, before the action can close anything). Nothing in
either method awaits, so no lock is needed to keep a ``restart`` and a ``stop`` from
interleaving.

Why a replacement checked against a source hash, over a pinned hypercorn (as
app/fastsend.py): what `IdleTask` mirrors is a private detail of hypercorn (the name
`TCPServer.__init__` looks up, and what its ``restart``/``stop`` promise). `install`
hashes `TrioSingleTask`'s source and leaves hypercorn alone, with a warning, when it
is not the one this module was written against: an upgrade costs the speed-up,
never correctness; tests/test_idletask.py fails first.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.trio import tcp_server, worker_context

from app import upstream

log = logging.getLogger("chatwatch.idletask")

# sha256 of the dedented sources of what this mirrors and relies on, in hypercorn 0.18.0:
# TrioSingleTask and its _cancel_wrapper, and TCPServer.run and ._idle_timeout (how the
# timer is used: restarted at the start, its action ends at its first checkpoint when
# cancelled before the timeout).
EXPECTED_SOURCE_SHA256 = "c5ca8cc230128feedea7946e74997a4777ec48b7c4a002f83afc855b57a6952e"

# The name TCPServer.__init__ looks up in its module for each new connection.
_NAME = "TrioSingleTask"


def mirrored() -> list[Callable[..., object] | type]:
    return [
        worker_context.TrioSingleTask,
        worker_context._cancel_wrapper,
        tcp_server.TCPServer.run,
        tcp_server.TCPServer._idle_timeout,
    ]


def source_sha256() -> str:
    """The hash `install` compares: of the sources, dedented, so only code changes count."""
    digest = hashlib.sha256()
    for obj in mirrored():
        digest.update(textwrap.dedent(inspect.getsource(obj)).encode())
    return digest.hexdigest()


async def _run_in(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


class IdleTask:
    """`TrioSingleTask`'s contract: at most one running `action`; ``restart`` replaces
    it, ``stop`` ends it. Both are synchronous underneath (async only because
    hypercorn awaits them)."""

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        if self._scope is not None:
            self._scope.cancel()
        scope = self._scope = trio.CancelScope()
        # hypercorn's own TrioSingleTask reaches into the task group the same way.
        task_group._nursery.start_soon(_run_in, scope, action)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._scope = None


def _check() -> list[str]:
    try:
        digest = source_sha256()
    except (OSError, TypeError):
        digest = None  # no source to read: never a match
    wrong = [] if digest == EXPECTED_SOURCE_SHA256 else ["TrioSingleTask and TCPServer's use of it"]
    if getattr(tcp_server, _NAME) is not worker_context.TrioSingleTask:
        wrong.append(f"tcp_server.{_NAME}")
    return wrong


_replacement = upstream.Replacement(log, tcp_server, _NAME, IdleTask, _check)
install = _replacement.install
uninstall = _replacement.uninstall
installed = _replacement.installed
