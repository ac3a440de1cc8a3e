"""History on JetStream: the stream that keeps every conversation, and how to read it.

Producers keep publishing with plain NATS publish on ``chat.{chunk,message}.{id}``; a
JetStream stream (default ``CHAT``) stores those subjects and *republishes* each stored
message, with its stream sequence in the ``Nats-Sequence`` header, on
``chatwatch.live.{stream}.chat.{kind}.{id}``. The hub subscribes to the republished
subject, one core subscription per conversation, so every live event carries its
position without any JetStream consumer. Replays read the stream with direct get
(`jsapi`), which costs the server no state per reader.

An event's id is ``{epoch}-{seq}``: the epoch is the stream's creation time, so the
positions of a deleted and recreated stream are never taken for the old ones.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from app import jsapi
from app.errors import HistoryError

log = logging.getLogger("chatwatch.history")

LIVE_PREFIX = "chatwatch.live"
_REQUIRED_SUBJECTS = ("chat.chunk.*", "chat.message.*")
_ID = re.compile(r"([0-9a-z]{1,16})-([0-9]{1,19})")
_CREATED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?")


class Caller(Protocol):
    """What history needs from the bus: run a coroutine with the nats-py client."""

    async def call(self, fn: Any, *args: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    stream: str = "CHAT"
    max_age: float = 7 * 24 * 3600.0
    max_per_conversation: int = 10000
    replicas: int = 1
    replay_cap: int = 5000


@dataclass(frozen=True, slots=True)
class Position:
    """Where a conversation stands in the stream: its last chunk and message seqs."""

    chunk: int
    message: int

    @property
    def last(self) -> int:
        return max(self.chunk, self.message)


def epoch_of(created: str) -> str:
    """The stream's identity from its creation time (RFC 3339, ns): base-36 nanoseconds."""
    import calendar
    import time

    match = _CREATED.match(created)
    if match is None:
        raise HistoryError(f"stream creation time not understood: {created!r}")
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    nanos = seconds * 1_000_000_000 + int((match.group(2) or "0").ljust(9, "0"))
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while nanos:
        nanos, rest = divmod(nanos, 36)
        out = digits[rest] + out
    return out or "0"


def _covers(pattern: str, subject: str) -> bool:
    """Whether stream subject `pattern` matches every subject matched by `subject`."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return i < len(s)
        if i >= len(s):
            return False
        if token != "*" and token != s[i]:
            return False
        if token != "*" and s[i] in ("*", ">"):
            return False
    return len(p) == len(s)


def stream_config(cfg: HistoryConfig) -> dict[str, Any]:
    return {
        "name": cfg.stream,
        "subjects": list(_REQUIRED_SUBJECTS),
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "num_replicas": cfg.replicas,
        "max_age": int(cfg.max_age * 1_000_000_000),
        "max_msgs_per_subject": cfg.max_per_conversation,
        "allow_direct": True,
        "republish": {"src": ">", "dest": f"{LIVE_PREFIX}.{cfg.stream}.>"},
    }


def check_fit(config: dict[str, Any]) -> str:
    """The republish prefix of an existing stream, or HistoryError naming what misfits."""
    name = config.get("name", "?")
    subjects = config.get("subjects") or []
    missing = [s for s in _REQUIRED_SUBJECTS if not any(_covers(p, s) for p in subjects)]
    problems = []
    if missing:
        problems.append(f"its subjects do not cover {', '.join(missing)}")
    if not config.get("allow_direct"):
        problems.append("allow_direct is off (replays use direct get)")
    republish = config.get("republish") or {}
    src, dest = republish.get("src", ">"), republish.get("dest", "")
    if not dest:
        problems.append("it has no RePublish (live events need their stream sequence)")
    elif republish.get("headers_only"):
        problems.append("its RePublish is headers_only")
    elif src != ">" or not dest.endswith(".>"):
        problems.append(
            f"its RePublish must be src '>' to dest 'PREFIX.>', not {src!r} -> {dest!r}"
        )
    if problems:
        raise HistoryError(f"JetStream stream {name} does not fit: " + "; ".join(problems))
    prefix: str = dest[: -len(".>")]
    return prefix


class History:
    """One stream, read without consumers; shared by every topic of the process."""

    def __init__(self, bus: Caller, cfg: HistoryConfig, epoch: str, prefix: str) -> None:
        self._bus = bus
        self.cfg = cfg
        self.epoch = epoch
        self.prefix = prefix

    def live_subject(self, conversation_id: str) -> str:
        return f"{self.prefix}.chat.*.{conversation_id}"

    def event_id(self, seq: int) -> str:
        return f"{self.epoch}-{seq}"

    def parse_id(self, raw: str) -> int | str:
        """The sequence after which to resume, or the reason the id cannot be used."""
        match = _ID.fullmatch(raw)
        if match is None:
            return "malformed id"
        if match.group(1) != self.epoch:
            return "it is from another stream (the stream was deleted and recreated)"
        return int(match.group(2))

    async def position(self, conversation_id: str) -> Position:
        stream = self.cfg.stream
        chunk = await self._bus.call(
            jsapi.direct_get, stream, {"last_by_subj": f"chat.chunk.{conversation_id}"}
        )
        message = await self._bus.call(
            jsapi.direct_get, stream, {"last_by_subj": f"chat.message.{conversation_id}"}
        )
        return Position(chunk.seq if chunk else 0, message.seq if message else 0)

    async def fetch(
        self, conversation_id: str, after: int, limit: int = 256
    ) -> tuple[list[jsapi.StoredMessage], bool]:
        result: tuple[list[jsapi.StoredMessage], bool] = await self._bus.call(
            jsapi.fetch_after, self.cfg.stream, f"chat.*.{conversation_id}", after, limit
        )
        return result

    async def check_resume(self, conversation_id: str, after: int) -> str | None:
        """Why events of the conversation after `after` cannot all be replayed, or None.

        Deleted events are the oldest ones: of the whole stream (age) or of one subject
        (the per-conversation limit). A subject that was never trimmed and a stream
        whose first kept event is at most ``after + 1`` lose nothing after `after`;
        otherwise the gap is refused rather than replayed partially. Not seen: events
        an operator deleted or purged by hand (README, limits).
        """
        info = await self._bus.call(jsapi.stream_info, self.cfg.stream, f"chat.*.{conversation_id}")
        created = epoch_of(str(info.get("created", "")))
        if created != self.epoch:
            return "it is from another stream (the stream was deleted and recreated)"
        state = info.get("state", {})
        last = int(state.get("last_seq", 0))
        first = int(state.get("first_seq", 0))
        if after > last:
            return "it is newer than anything stored"
        counts: dict[str, int] = state.get("subjects") or {}
        # The stream's own limit, not our flag: the stream may predate the flag's value.
        limit = int((info.get("config") or {}).get("max_msgs_per_subject", -1))
        for kind in ("chunk", "message"):
            subject = f"chat.{kind}.{conversation_id}"
            count = int(counts.get(subject, 0))
            never_trimmed = limit <= 0 or count < limit
            if never_trimmed and after + 1 >= first:
                continue
            oldest = await self._bus.call(
                jsapi.direct_get, self.cfg.stream, {"seq": 1, "next_by_subj": subject}
            )
            if oldest is not None and after + 1 >= oldest.seq:
                continue
            if oldest is None and after + 1 >= first:
                continue
            return "it is older than the history still kept"
        return None


async def open_history(bus: Caller, cfg: HistoryConfig, mode: str) -> History | None:
    """Find or create the stream; None when history is off or JetStream is missing.

    Raises:
        HistoryError: `mode` is "on" and there is no JetStream, or the stream that
            exists does not fit (named in the message), or it cannot be created.
    """
    if mode == "off":
        return None
    try:
        await bus.call(jsapi.account_info)
    except jsapi.JetStreamUnavailable:
        if mode == "on":
            raise HistoryError("--history on, but the NATS servers have no JetStream") from None
        log.warning("NATS has no JetStream: history is off (no ids, no resume)")
        return None
    except jsapi.ApiError as exc:
        if mode == "on":
            raise HistoryError(f"JetStream is not usable: {exc}") from None
        log.warning("JetStream is not usable (%s): history is off", exc)
        return None
    try:
        info = await bus.call(jsapi.stream_info, cfg.stream)
    except jsapi.ApiError as exc:
        if exc.err_code != 10059:  # stream not found
            raise HistoryError(f"JetStream stream {cfg.stream}: {exc}") from None
        try:
            info = await bus.call(jsapi.stream_create, stream_config(cfg))
        except jsapi.ApiError as create_exc:
            raise HistoryError(
                f"cannot create JetStream stream {cfg.stream}: {create_exc}"
            ) from None
        log.info("created JetStream stream %s", cfg.stream)
    prefix = check_fit(info.get("config", {}))
    history = History(bus, cfg, epoch_of(str(info.get("created", ""))), prefix)
    log.info("history on: stream %s, epoch %s", cfg.stream, history.epoch)
    return history
