"""Settings: one frozen object, and the one place its defaults and checks are written.

Each field of `Settings` carries its own `Option` (help text and a parser that
validates a string the way the command line and the environment both give it), so
the command line (`app.cli`), the environment (``CHATWATCH_<FLAG>``), the README's
table and the workers (which get the parent's `Settings` object, not an argv) all
read the same default and the same check.

Why argparse and this small table rather than a settings library: the settings are
a flat list of scalars with one source each (a flag or its environment variable),
argparse already gives the subcommands, ``--help`` and usage errors, and what a
library such as pydantic-settings or click would add (nested models, files, type
coercion) is either unused here or a second way to spell the same check. What it
would not give for free is the one thing we need on top: an error that names the
setting as the user gave it (``CHATWATCH_KEEPALIVE`` or ``--keepalive``), which
`app.cli` does in a few lines over this table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

NATS_SCHEMES = ("nats", "tls", "ws", "wss")
LOG_LEVELS = ("debug", "info", "warning", "error")
HISTORY_MODES = ("auto", "on", "off")
FAST_SEND_MODES = ("on", "off")
# More processes than this on one port is a typo, not a deployment: each worker holds
# its own NATS connection and store pool.
MAX_WORKERS = 64
# TCP_USER_TIMEOUT is a C unsigned int of milliseconds that Python passes as a signed
# int: beyond this, setsockopt overflows.
MAX_WRITE_TIMEOUT = (2**31 - 1) // 1000
# JetStream accepts more, but a name a shell, a subject and a file system all take.
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")


# ---------------------------------------------------------------- value parsers
# Each takes the text as the user wrote it and raises ValueError with a message that
# makes sense after "the setting: ".


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _show(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def seconds(
    *, minimum: float = 0.0, inclusive: bool = False, maximum: float = math.inf
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _number(text)
        low_ok = value >= minimum if inclusive else value > minimum
        if not low_ok:
            raise ValueError(f"must be {'>=' if inclusive else '>'} {_show(minimum)}, got {text!r}")
        if value > maximum:
            raise ValueError(f"must be <= {_show(maximum)}, got {text!r}")
        return value

    return parse


def count(*, minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {text!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}, got {text!r}")
        return value

    return parse


def worker_count(text: str) -> int:
    """A number of processes, or ``auto``: one per CPU core this process may run on."""
    if text == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, MAX_WORKERS))
    return count(maximum=MAX_WORKERS)(text)


def one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def bind_address(text: str) -> str:
    """HOST:PORT (``[::1]:8000`` for IPv6), port 0-65535 (0: any free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    if int(port) > 65535:
        raise ValueError(f"port out of range (0-65535): {text!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(f"an IPv6 host goes in brackets, as [::1]:8000: {text!r}")
    return text


def nats_url(text: str) -> str:
    """One NATS server URL: nats/tls/ws/wss, a host, an optional port 1-65535."""
    parts = urlsplit(text)
    if parts.scheme not in NATS_SCHEMES:
        raise ValueError(f"not a NATS URL (nats://HOST:PORT, or tls, ws, wss): {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {text!r}")
    if port == 0:
        raise ValueError(f"bad port in {text!r}")
    return text


def nats_urls(text: str) -> tuple[str, ...] | None:
    """Comma-separated URLs; empty: None (start an embedded nats-server)."""
    urls = tuple(nats_url(u.strip()) for u in text.split(",") if u.strip())
    return urls or None


def nats_url_list(text: str) -> str:
    """`nats_urls` for a command that keeps the text (``publish``): checked, unchanged."""
    if nats_urls(text) is None:
        raise ValueError("no NATS URL given")
    return text


def database_url(text: str) -> str | None:
    from app.errors import UsageError
    from app.store import check_database_url

    try:
        check_database_url(text)
    except (ValueError, UsageError) as exc:
        raise ValueError(str(exc)) from None
    return text or None


def stream_name(text: str) -> str:
    if not _STREAM_NAME.fullmatch(text):
        raise ValueError(f"a JetStream stream name is letters, digits, - and _: {text!r}")
    return text


# ---------------------------------------------------------------- the settings


@dataclass(frozen=True, slots=True)
class Option:
    """How one `Settings` field is given on the command line and in the environment."""

    help: str
    parse: Callable[[str], Any]
    metavar: str | None = None
    # The flag, when it is not the field's name (``nats_urls`` is ``--nats-url``).
    flag: str | None = None
    choices: Sequence[str] | None = None


def _opt(default: Any, help: str, parse: Callable[[str], Any], **kw: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, parse, **kw)})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `service.run` needs. The defaults here are the only ones."""

    bind: str = _opt("127.0.0.1:8000", "where to listen", bind_address, metavar="HOST:PORT")
    nats_urls: tuple[str, ...] | None = _opt(
        None,
        "NATS servers, comma-separated; none: start nats-server from the wheel as a child",
        nats_urls,
        metavar="URL[,URL...]",
        flag="--nats-url",
    )
    database_url: str | None = _opt(
        None,
        "sqlite:///PATH or postgresql://USER@HOST/DB (default: sqlite, ./chatwatch.db)",
        database_url,
        metavar="URL",
    )
    keepalive: float = _opt(
        15.0, "seconds between keepalive comments on an idle stream", seconds(), metavar="SECONDS"
    )
    watcher_buffer: int = _opt(
        8192, "frames queued per watcher before it is cut off as a slow consumer", count()
    )
    watcher_buffer_bytes: int = _opt(
        16 * 1024 * 1024, "bytes queued per watcher before the same", count()
    )
    max_payload: int = _opt(
        1024 * 1024, "larger NATS payloads become an error event naming the size", count()
    )
    max_watchers: int = _opt(20000, "open streams per process; beyond: 429", count())
    max_watchers_per_session: int = _opt(100, "open streams per session; beyond: 429", count())
    write_timeout: float = _opt(
        30.0,
        "seconds unacknowledged data may wait before the connection is dropped",
        seconds(maximum=MAX_WRITE_TIMEOUT),
        metavar="SECONDS",
    )
    shutdown_grace: float = _opt(
        1.0, "seconds the streams get to close at shutdown", seconds(), metavar="SECONDS"
    )
    workers: int = _opt(
        1,
        f"processes serving one socket (at most {MAX_WORKERS}); auto: one per CPU core",
        worker_count,
        metavar="N|auto",
    )
    write_window: float = _opt(
        0.0,
        "milliseconds a stream's frames may wait to be written together (0: at once)",
        seconds(inclusive=True, maximum=1000.0),
        metavar="MS",
    )
    fast_send: str = _opt(
        "on",
        "on: write a frame the kernel takes at once without a scheduler pass, and frame its"
        " HTTP/1.1 chunk without h11's state machine (app/fastsend.py, app/fastchunk.py)",
        one_of(FAST_SEND_MODES),
        choices=FAST_SEND_MODES,
    )
    log_level: str = _opt("info", "log level", one_of(LOG_LEVELS), choices=LOG_LEVELS)
    # History (resume and late join) on JetStream.
    history: str = _opt(
        "auto",
        "auto: on when the NATS servers have JetStream; on: exit when they do not",
        one_of(HISTORY_MODES),
        choices=HISTORY_MODES,
    )
    history_stream: str = _opt("CHAT", "JetStream stream holding the history", stream_name)
    history_max_age: float = _opt(
        7 * 24 * 3600.0,
        "seconds an event is kept (0: no age limit)",
        seconds(inclusive=True),
        metavar="SECONDS",
    )
    history_max_per_conversation: int = _opt(
        10000, "events kept per conversation and kind", count()
    )
    history_replicas: int = _opt(1, "replicas of the history stream (1-5)", count(maximum=5))
    replay_cap: int = _opt(
        5000, "most events one resume or late join replays (beyond: the newest)", count()
    )
    # Not an option: the tests' JetStream directory for the embedded nats-server.
    nats_data_dir: str | None = None
    # Not options: set by the parent of `--workers N` for each worker, so that any
    # worker's /metrics can answer for all of them (see metrics.py).
    metrics_dir: str | None = None
    worker: int = 0

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    def to_json(self) -> str:
        """For a worker process: the whole object, not a hand-made argv."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()
        }
        return cls(**values)


def option_of(f: dataclasses.Field[Any]) -> Option | None:
    option = f.metadata.get("option")
    return option if isinstance(option, Option) else None


def flag_of(f: dataclasses.Field[Any]) -> str:
    option = option_of(f)
    return (option.flag if option and option.flag else None) or "--" + f.name.replace("_", "-")


def env_var(flag: str) -> str:
    """``--nats-url`` -> ``CHATWATCH_NATS_URL``."""
    return "CHATWATCH_" + flag.removeprefix("--").replace("-", "_").upper()


def options() -> list[tuple[dataclasses.Field[Any], Option]]:
    """The fields given on the command line, in declaration order."""
    return [(f, o) for f in dataclasses.fields(Settings) if (o := option_of(f)) is not None]
