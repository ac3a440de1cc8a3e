"""Ports for tests. Prefer binding port 0 where the bound port can be read back; these
are for the rest."""

from __future__ import annotations

import socket
from collections.abc import Generator
from contextlib import contextmanager


def free_port() -> int:
    """A port that was free a moment ago. Racy by nature: another process may take it
    before the caller's subprocess binds it, so call it just before starting that
    subprocess and treat "address in use" from it as a reason to retry."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def closed_port() -> Generator[int, None, None]:
    """A port where connections are refused, for as long as the block runs.

    The socket stays bound without listening: the kernel refuses connections to it and
    no other process can take the port meanwhile (a port merely found free could be
    taken and answer).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
