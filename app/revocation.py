"""Ending the open streams of sessions that were revoked or have expired.

A watch request is authorized once, when it arrives; a session revoked or expired
afterwards must not keep its streams (CONTRACT: they get an ``error`` event and end
within 5 s, on every instance sharing the store). Every instance asks the store on
a short interval, in one batched query for all its open sessions, which of them
ended. Only a definite answer ends a stream: a store that cannot be reached ends
nothing.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from app import sse
from app.errors import StoreUnavailable

log = logging.getLogger("chatwatch.revocation")

# Seconds between checks: with one check's own time, well inside the contract's 5 s.
CHECK_INTERVAL = 2.0

_FINALS = {reason: sse.error_frame(f"session {reason}") for reason in ("revoked", "expired")}


class SessionStore(Protocol):
    """The part of `store.Store` this module uses."""

    async def ended_sessions(self, token_hashes: list[str]) -> dict[str, str]: ...


class SessionHub(Protocol):
    """The part of `hub.Hub` this module uses."""

    def owners(self) -> list[str]: ...

    def end_sessions(self, finals: dict[str, bytes]) -> int: ...


async def end_revoked_sessions(
    store: SessionStore, hub: SessionHub, interval: float = CHECK_INTERVAL
) -> None:
    """Run forever (start it in the service's nursery): one check per `interval`."""
    unavailable = False
    while True:
        await trio.sleep(interval)
        owners = hub.owners()
        if not owners:
            continue
        try:
            ended = await store.ended_sessions(owners)
        except StoreUnavailable as exc:
            if not unavailable:
                log.warning("cannot check sessions for revocation: %s", exc)
            unavailable = True
            continue
        if unavailable:
            log.info("session checks resumed")
            unavailable = False
        if not ended:
            continue
        # Sessions that left meanwhile are simply not found by the hub.
        finals = {h: _FINALS.get(reason, _FINALS["revoked"]) for h, reason in ended.items()}
        count = hub.end_sessions(finals)
        if count:
            log.info("ended %d stream(s) of %d revoked or expired session(s)", count, len(ended))
