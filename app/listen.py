"""The listening socket, made here so that accepted connections inherit its options.

Linux copies a listener's socket options to every connection it accepts: TCP
keepalive (a peer that vanished is noticed even on a quiet stream), TCP_USER_TIMEOUT
(a write nobody acknowledges fails instead of parking the writer forever; hypercorn's
writes are not cancellable), TCP_NODELAY, and SO_REUSEPORT for several workers.
"""

from __future__ import annotations

import socket


def make_listener(
    host: str, port: int, *, reuse_port: bool = False, write_timeout: float = 30.0
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
