"""JetStream's JSON API over plain NATS requests: the asyncio side of history.

Only what history needs, spoken directly (``$JS.API.*`` subjects), so that no
JetStream consumer is ever created: the stream is read with *direct get*, which any
replica answers and which costs the server no state. Every function here takes the
nats-py client and runs on the asyncio loop (through `Bus.call`).

Server versions: direct get exists since 2.9; *batch* direct get (many messages per
request, ended by a ``204 EOB`` status) since 2.11. Older servers are read one message
per request (`supports_batch`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

API_TIMEOUT = 5.0
_BATCH = 256


class JetStreamUnavailable(Exception):
    """The NATS system has no JetStream (no responders on ``$JS.API.INFO``)."""


class ApiError(Exception):
    """An error answer from the JetStream API (``{"error": {...}}``)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}/{err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    subject: str
    data: bytes


async def _api(nc: Any, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import nats.errors

    payload = b"" if body is None else json.dumps(body).encode()
    try:
        msg = await nc.request(subject, payload, timeout=API_TIMEOUT)
    except nats.errors.NoRespondersError as exc:
        raise JetStreamUnavailable("no JetStream on this NATS system") from exc
    answer: dict[str, Any] = json.loads(msg.data)
    error = answer.get("error")
    if error:
        raise ApiError(
            int(error.get("code", 0)), int(error.get("err_code", 0)), str(error.get("description"))
        )
    return answer


async def account_info(nc: Any) -> dict[str, Any]:
    return await _api(nc, "$JS.API.INFO")


async def stream_info(nc: Any, stream: str, subjects_filter: str | None = None) -> dict[str, Any]:
    body = {"subjects_filter": subjects_filter} if subjects_filter else None
    return await _api(nc, f"$JS.API.STREAM.INFO.{stream}", body)


async def stream_create(nc: Any, config: dict[str, Any]) -> dict[str, Any]:
    return await _api(nc, f"$JS.API.STREAM.CREATE.{config['name']}", config)


async def stream_delete(nc: Any, stream: str) -> dict[str, Any]:
    return await _api(nc, f"$JS.API.STREAM.DELETE.{stream}")


def supports_batch(nc: Any) -> bool:
    version = nc.connected_server_version
    return (version.major, version.minor) >= (2, 11)


def _stored(msg: Any) -> StoredMessage | None:
    headers = msg.headers or {}
    seq = headers.get("Nats-Sequence")
    subject = headers.get("Nats-Subject")
    if seq is None or subject is None:
        return None
    return StoredMessage(int(seq), subject, msg.data)


def _status(msg: Any) -> str | None:
    headers = msg.headers or {}
    status: str | None = headers.get("Status")
    return status


async def direct_get(nc: Any, stream: str, body: dict[str, Any]) -> StoredMessage | None:
    """One message by `body` (``seq`` + ``next_by_subj``, or ``last_by_subj``); None: none."""
    msg = await nc.request(
        f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode(), timeout=API_TIMEOUT
    )
    status = _status(msg)
    if status == "404":
        return None
    if status is not None and status != "200":
        raise ApiError(int(status), 0, (msg.headers or {}).get("Description", "direct get"))
    return _stored(msg)


async def fetch_after(
    nc: Any, stream: str, subject: str, after: int, limit: int
) -> tuple[list[StoredMessage], bool]:
    """Up to `limit` stored messages on `subject` (wildcards allowed) with seq > `after`.

    Returns (messages in stream order, whether more remain after the last one).
    """
    if not supports_batch(nc):
        out: list[StoredMessage] = []
        seq = after + 1
        while len(out) < limit:
            m = await direct_get(nc, stream, {"seq": seq, "next_by_subj": subject})
            if m is None:
                return out, False
            out.append(m)
            seq = m.seq + 1
        return out, True
    return await _batch_get(nc, stream, subject, after + 1, min(limit, _BATCH))


async def _batch_get(
    nc: Any, stream: str, subject: str, start: int, batch: int
) -> tuple[list[StoredMessage], bool]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    out: list[StoredMessage] = []
    more = [False]

    async def on_msg(msg: Any) -> None:
        if done.done():
            return
        status = _status(msg)
        if status is not None:
            # 204 EOB ends a batch; 404 says there was nothing at all.
            if status not in ("204", "404"):
                done.set_exception(
                    ApiError(int(status), 0, (msg.headers or {}).get("Description", ""))
                )
            else:
                done.set_result(None)
            return
        stored = _stored(msg)
        if stored is not None:
            out.append(stored)
            pending = (msg.headers or {}).get("Nats-Num-Pending")
            more[0] = pending is not None and int(pending) > 0
        if len(out) >= batch:
            done.set_result(None)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        body = {"seq": start, "next_by_subj": subject, "batch": batch}
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode(), reply=inbox)
        await asyncio.wait_for(asyncio.shield(done), API_TIMEOUT)
    finally:
        await sub.unsubscribe()
    return out, more[0]
