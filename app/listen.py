"""The listening socket, made here so that accepted connections inherit its options.

Linux copies a listener's socket options to every connection it accepts: TCP
keepalive (a peer that vanished is noticed even on a quiet stream), TCP_USER_TIMEOUT
(a write nobody acknowledges fails instead of parking the writer forever; hypercorn's
writes are not cancellable) and TCP_NODELAY.

There is one listener per deployment, made before anything else starts: with
``--workers N`` the children inherit it (no SO_REUSEPORT, so a second deployment on
the same port fails with "address already in use" instead of sharing it).
"""

from __future__ import annotations

import errno
import socket

from app.config import Settings
from app.errors import UsageError


def make_listener(host: str, port: int, *, write_timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(write_timeout * 1000))
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "permission denied (a port below 1024 needs privileges)",
}


def bind(settings: Settings, bind_name: str, write_timeout_name: str) -> socket.socket:
    """`make_listener` for `settings`, or UsageError naming the setting as given."""
    host, port = settings.host_port
    try:
        return make_listener(host, port, write_timeout=settings.write_timeout)
    except socket.gaierror as exc:
        raise UsageError(f"{bind_name} {settings.bind}: unknown host: {exc.strerror}") from None
    except OverflowError:
        raise UsageError(f"{write_timeout_name} {settings.write_timeout:g}: too large") from None
    except OSError as exc:
        reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        raise UsageError(f"{bind_name} {settings.bind}: {reason}") from None
