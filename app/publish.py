"""`chatwatch publish`: connect once, publish one message, confirm it, disconnect.

A one-shot command, so plain asyncio and no reconnecting: a server that refuses or
does not answer is reported at once, in one line, instead of being retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors

from app.errors import BusUnavailable, ChatwatchError, UsageError


class PayloadRejected(ChatwatchError):
    """Raised by `publish_once` when NATS will not take the payload (too large)."""


def encode_payload(text: str) -> bytes:
    """The payload argument as UTF-8.

    Raises:
        UsageError: it is not valid UTF-8 (the shell passed bytes Python could only
            keep as lone surrogates).
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"publish: the payload is not valid UTF-8 (at character {exc.start + 1})"
        ) from None


def publish_once(urls: Sequence[str], subject: str, payload: bytes, patience: float) -> None:
    """Publish `payload` on `subject` and wait until the server has it.

    Raises:
        BusUnavailable: the server refused the connection, or did not answer within
            `patience` seconds.
        PayloadRejected: the payload is larger than the server's max_payload.
    """
    asyncio.run(_publish(list(urls), subject, payload, patience))


async def _publish(urls: list[str], subject: str, payload: bytes, patience: float) -> None:
    where = ",".join(urls)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    try:
        async with asyncio.timeout(patience):
            try:
                nc: Any = await nats.connect(
                    servers=urls,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=patience,
                    error_cb=on_error,
                )
            except (OSError, nats.errors.Error) as exc:
                cause = errors[-1] if errors else exc
                if isinstance(cause, TimeoutError):
                    raise TimeoutError from None
                raise BusUnavailable(f"NATS at {where}: {_why(cause)}") from None
            try:
                await nc.publish(subject, payload)
                await nc.flush(timeout=max(1, int(patience)))
            except nats.errors.MaxPayloadError:
                raise PayloadRejected(
                    f"the payload ({len(payload)} bytes) is larger than the NATS server's "
                    f"max_payload ({nc.max_payload} bytes)"
                ) from None
            finally:
                await nc.close()
    except TimeoutError:
        raise BusUnavailable(f"NATS at {where} did not answer within {patience}s") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
