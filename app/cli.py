"""The `chatwatch` command line. Every option also reads CHATWATCH_<OPTION> from the
environment (``--nats-url`` = ``CHATWATCH_NATS_URL``); the command line wins."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from app import __version__, ids
from app.config import Settings
from app.errors import ChatwatchError, UsageError, unwrap_single
from app.store import DEFAULT_SESSION_TTL, open_store, sqlite_path

DEFAULT_PUBLISH_NATS = "nats://127.0.0.1:4222"


class _EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to CHATWATCH_* environment variables."""

    env: Mapping[str, str] = os.environ

    def add_option(self, flag: str, **kwargs: Any) -> None:
        var = "CHATWATCH_" + flag.lstrip("-").replace("-", "_").upper()
        if var in self.env:
            kwargs["default"] = self.env[var]
            kwargs.pop("required", None)
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {var}]".strip()
        self.add_argument(flag, **kwargs)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _conversation_id(text: str) -> str:
    cid = ids.parse_conversation_id(text)
    if cid is None:
        raise argparse.ArgumentTypeError(f"not a hyphenated UUID: {text!r}")
    return cid


def _add_database(p: _EnvParser) -> None:
    p.add_option("--database-url", default=None, help="sqlite:///PATH (default ./chatwatch.db)")


def _add_serve_options(p: _EnvParser, *, bind: str) -> None:
    p.add_option("--bind", default=bind, help="HOST:PORT to listen on")
    p.add_option(
        "--nats-url",
        default=None,
        help="NATS URL(s), comma-separated; none: start an embedded nats-server",
    )
    _add_database(p)
    p.add_option(
        "--keepalive",
        type=_positive_float,
        default=15.0,
        help="seconds between keepalive comments on an idle stream",
    )
    p.add_option(
        "--watcher-buffer",
        type=_positive_int,
        default=8192,
        help="frames queued per watcher before it is cut off as a slow consumer",
    )
    p.add_option(
        "--watcher-buffer-bytes",
        type=_positive_int,
        default=16 * 1024 * 1024,
        help="bytes queued per watcher before it is cut off as a slow consumer",
    )
    p.add_option(
        "--max-payload",
        type=_positive_int,
        default=1024 * 1024,
        help="largest NATS payload forwarded, in bytes",
    )
    p.add_option(
        "--max-watchers",
        type=_positive_int,
        default=20000,
        help="open streams per process (429 beyond)",
    )
    p.add_option(
        "--max-watchers-per-session",
        type=_positive_int,
        default=100,
        help="open streams per session (429 beyond)",
    )
    p.add_option(
        "--shutdown-grace",
        type=_positive_float,
        default=1.0,
        help="seconds streams get to close at shutdown",
    )
    p.add_option(
        "--workers", type=_positive_int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    p.add_option(
        "--write-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds unacknowledged data may wait before a connection is dropped",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_option("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    _EnvParser.env = env
    parser = _EnvParser(prog="chatwatch", description="Watch live AI conversations over SSE.")
    parser.add_argument("--version", action="version", version=f"chatwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_EnvParser)

    serve = commands.add_parser("serve", help="run the service")
    _add_serve_options(serve, bind="127.0.0.1:8000")

    demo = commands.add_parser("demo", help="serve with a simulated AI run and a viewer page")
    _add_serve_options(demo, bind="127.0.0.1:8000")

    users = commands.add_parser("users", help="manage users").add_subparsers(
        dest="action", required=True, parser_class=_EnvParser
    )
    users_add = users.add_parser("add", help="add a user; prints its id")
    users_add.add_argument("name")
    _add_database(users_add)

    sessions = commands.add_parser("sessions", help="manage sessions").add_subparsers(
        dest="action", required=True, parser_class=_EnvParser
    )
    create = sessions.add_parser("create", help="create a session; prints its token")
    create.add_argument("user_id")
    create.add_option(
        "--ttl", type=_positive_float, default=DEFAULT_SESSION_TTL, help="lifetime in seconds"
    )
    _add_database(create)
    revoke = sessions.add_parser("revoke", help="revoke a session")
    revoke.add_argument("token")
    _add_database(revoke)

    conversations = commands.add_parser("conversations", help="manage conversations")
    conv = conversations.add_subparsers(dest="action", required=True, parser_class=_EnvParser)
    conv_create = conv.add_parser("create", help="create a conversation; prints its id")
    conv_create.add_option("--owner", required=True, help="owner's user id")
    conv_create.add_option("--title", default="")
    _add_database(conv_create)

    publish = commands.add_parser("publish", help="publish one event on NATS")
    publish.add_argument("kind", choices=["chunk", "message"])
    publish.add_argument("conversation_id", type=_conversation_id)
    publish.add_argument("json", help="the payload (sent as given)")
    publish.add_option("--nats-url", default=DEFAULT_PUBLISH_NATS, help="NATS URL(s)")
    publish.add_option("--timeout", type=_positive_float, default=5.0)

    watch = commands.add_parser("watch", help="watch one conversation in the terminal")
    watch.add_argument("conversation_id", type=_conversation_id)
    watch.add_option("--token", required=True, help="session token")
    watch.add_option("--url", default="http://127.0.0.1:8000", help="chatwatch base URL")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    urls = (
        tuple(u.strip() for u in args.nats_url.split(",") if u.strip()) if args.nats_url else None
    )
    return Settings(
        bind=args.bind,
        nats_urls=urls or None,
        database_url=args.database_url,
        keepalive=args.keepalive,
        watcher_buffer=args.watcher_buffer,
        watcher_buffer_bytes=args.watcher_buffer_bytes,
        max_payload=args.max_payload,
        max_watchers=args.max_watchers,
        max_watchers_per_session=args.max_watchers_per_session,
        shutdown_grace=args.shutdown_grace,
        workers=args.workers,
        log_level=args.log_level,
        reuse_port=args.reuse_port,
        write_timeout=args.write_timeout,
    )


def _admin(args: argparse.Namespace) -> Callable[[], Awaitable[str | None]]:
    async def go() -> str | None:
        async with open_store(args.database_url) as store:
            if args.command == "users":
                return await store.add_user(args.name)
            if args.command == "sessions" and args.action == "create":
                return await store.create_session(args.user_id, args.ttl)
            if args.command == "sessions":
                await store.revoke_session(args.token)
                return None
            owner = ids.parse_conversation_id(args.owner) or args.owner
            return await store.create_conversation(owner, args.title)

    return go


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    args = build_parser(env).parse_args(argv)
    if getattr(args, "database_url", None) is not None:
        # Checked before anything starts: an unsupported scheme is a usage error,
        # not a traceback from deep inside the service.
        try:
            sqlite_path(args.database_url)
        except ValueError as exc:
            print(f"chatwatch: --database-url: {exc}", file=sys.stderr)
            return 2
    level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command in ("serve", "demo"):
            from app import workers

            return workers.main(args.command, settings_from(args))
        if args.command == "publish":
            from app.publish import encode_payload, publish_once

            subject = (ids.chunk_subject if args.kind == "chunk" else ids.message_subject)(
                args.conversation_id
            )
            urls = [u.strip() for u in args.nats_url.split(",") if u.strip()]
            try:
                payload = encode_payload(args.json)
            except UsageError as exc:
                print(f"chatwatch: {exc}", file=sys.stderr)
                return 2
            publish_once(urls, subject, payload, args.timeout)
            return 0
        if args.command == "watch":
            from app.termwatch import watch

            return trio.run(watch, args.url, args.conversation_id, args.token)
        result = trio.run(_admin(args))
    except ChatwatchError as exc:
        print(f"chatwatch: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Errors raised inside a nursery (publish_once's BusUnavailable) arrive wrapped.
        error = unwrap_single(group)
        if not isinstance(error, ChatwatchError):
            raise
        print(f"chatwatch: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if result is not None:
        print(result)
    return 0
