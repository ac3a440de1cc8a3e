"""The `chatwatch` command line. Every option also reads CHATWATCH_<OPTION> from the
environment (``--nats-url`` = ``CHATWATCH_NATS_URL``); the command line wins."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

import trio

from app import __version__, config, ids
from app.config import Settings, env_var
from app.errors import ChatwatchError, UsageError, unwrap_single
from app.listen import bind
from app.store import DEFAULT_SESSION_TTL, open_store

DEFAULT_PUBLISH_NATS = "nats://127.0.0.1:4222"


class _FromEnv:
    """A value taken from the environment, kept as text until the command is known.

    argparse would convert a string default with the option's type and report a bad
    one as the flag (``argument --keepalive: invalid _number value``), for options of
    every subcommand alike. Wrapped, it passes through untouched and `resolve` checks
    it with the same parser as the flag, naming the variable.
    """

    __slots__ = ("parse", "text", "var")

    def __init__(self, var: str, text: str, parse: Callable[[str], Any] | None) -> None:
        self.var, self.text, self.parse = var, text, parse


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse: its ValueError message becomes the usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


class _EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to CHATWATCH_* environment variables,
    and whose usage errors are one line."""

    env: Mapping[str, str] = os.environ

    def add_option(
        self, flag: str, *, parse: Callable[[str], Any] | None = None, **kwargs: Any
    ) -> None:
        var = env_var(flag)
        if parse is not None:
            kwargs["type"] = _flag_type(parse)
        if var in self.env:
            kwargs["default"] = _FromEnv(var, self.env[var], parse)
            kwargs.pop("required", None)
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {var}]".strip()
        self.add_argument(flag, **kwargs)

    def error(self, message: str) -> NoReturn:
        # A bad value reads as one from the environment does: the setting, the reason.
        if message.startswith("argument "):
            self.exit(2, f"chatwatch: {message.removeprefix('argument ')}\n")
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def resolve(args: argparse.Namespace) -> dict[str, str]:
    """Check the values that came from the environment; return {dest: variable}.

    Raises UsageError naming the variable, as the user gave it.
    """
    given: dict[str, str] = {}
    for dest, value in vars(args).items():
        if isinstance(value, _FromEnv):
            try:
                setattr(args, dest, value.parse(value.text) if value.parse else value.text)
            except ValueError as exc:
                raise UsageError(f"{value.var}: {exc}") from None
            given[dest] = value.var
    return given


def _conversation_id(text: str) -> str:
    cid = ids.parse_conversation_id(text)
    if cid is None:
        raise argparse.ArgumentTypeError(f"not a hyphenated UUID: {text!r}")
    return cid


def _add_database(p: _EnvParser) -> None:
    p.add_option(
        "--database-url",
        default=None,
        parse=config.database_url,
        metavar="URL",
        help="sqlite:///PATH (default ./chatwatch.db)",
    )


def _add_serve_options(p: _EnvParser) -> None:
    """One option per `Settings` field, with the field's default and parser."""
    for f, option in config.options():
        p.add_option(
            config.flag_of(f),
            dest=f.name,
            default=f.default,
            parse=option.parse,
            metavar=option.metavar,
            choices=option.choices,
            # A None default is explained by the help itself (a computed default).
            help=option.help if f.default is None else f"{option.help} (default: {f.default})",
        )


def build_parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    _EnvParser.env = env
    parser = _EnvParser(prog="chatwatch", description="Watch live AI conversations over SSE.")
    parser.add_argument("--version", action="version", version=f"chatwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_EnvParser)

    serve = commands.add_parser("serve", help="run the service")
    _add_serve_options(serve)

    demo = commands.add_parser("demo", help="serve with a simulated AI run and a viewer page")
    _add_serve_options(demo)

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
        "--ttl",
        parse=config.seconds(),
        default=DEFAULT_SESSION_TTL,
        metavar="SECONDS",
        help="lifetime in seconds",
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
    publish.add_option(
        "--nats-url",
        default=DEFAULT_PUBLISH_NATS,
        parse=config.nats_url_list,
        metavar="URL[,URL...]",
        help="NATS URL(s)",
    )
    publish.add_option("--timeout", parse=config.seconds(), default=5.0, metavar="SECONDS")

    watch = commands.add_parser("watch", help="watch one conversation in the terminal")
    watch.add_argument("conversation_id", type=_conversation_id)
    watch.add_option("--token", required=True, help="session token")
    watch.add_option("--url", default="http://127.0.0.1:8000", help="chatwatch base URL")
    return parser


def parse_args(
    argv: Sequence[str] | None, env: Mapping[str, str] = os.environ
) -> tuple[argparse.Namespace, dict[str, str]]:
    """The parsed command and {dest: environment variable} for values taken from there.

    A bad flag exits 2 (argparse); a bad environment value raises UsageError.
    """
    args = build_parser(env).parse_args(argv)
    return args, resolve(args)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f, _ in config.options()})


def _named(field: str, given: Mapping[str, str]) -> str:
    """A setting as the user gave it: its environment variable, else its flag."""
    return given.get(field) or "--" + field.replace("_", "-")


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
    try:
        args, given = parse_args(argv, env)
    except UsageError as exc:
        print(f"chatwatch: {exc}", file=sys.stderr)
        return 2
    level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command in ("serve", "demo"):
            return _serve(args, given)
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
    except BaseExceptionGroup as group:
        # Errors raised inside a nursery (publish_once's BusUnavailable) arrive wrapped.
        error = unwrap_single(group)
        if isinstance(error, BrokenPipeError):
            return _stdout_gone()
        if not isinstance(error, ChatwatchError):
            raise
        return _fail(error)
    except BrokenPipeError:
        return _stdout_gone()
    except ChatwatchError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    if result is not None:
        print(result)
    return 0


def _stdout_gone() -> int:
    """The reader of our output went away (``chatwatch watch ... | head``): end quietly,
    as a command killed by SIGPIPE does (status 141), instead of a traceback. stdout is
    pointed at /dev/null first, or the interpreter's last flush would fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _fail(error: ChatwatchError) -> int:
    """One line; 2 for bad input or configuration, 1 for anything else."""
    print(f"chatwatch: {error}", file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1


def _serve(args: argparse.Namespace, given: Mapping[str, str]) -> int:
    from app import workers

    settings = settings_from(args)
    if args.command == "demo" and settings.workers != 1:
        print(
            f"chatwatch demo: {_named('workers', given)} ignored: the demo is one process",
            file=sys.stderr,
        )
    # Bound before anything starts (the embedded nats-server, the store, workers): a
    # port in use is one line, with nothing to undo.
    listener = bind(settings, _named("bind", given), _named("write_timeout", given))
    return workers.main(args.command, settings, listener)
