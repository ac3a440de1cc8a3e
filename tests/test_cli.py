"""The `chatwatch` command line: admin commands in-process (`app.cli.main`, which
calls `trio.run` itself, so those tests are plain sync functions), and `publish`,
`watch`, `serve` and `demo` as real subprocesses against real servers."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from app.cli import build_parser, main, parse_args, settings_from
from app.embedded import nats_server_binary
from app.store import DEFAULT_SESSION_TTL, Access, Grant, SQLiteStore
from tests.conftest import Seed, Service, chunk, start_service, wait_until, watch_path
from tests.natsproc import NatsProcess
from tests.ports import closed_port, free_port
from tests.procfs import children_of, is_running
from tests.served import wait_listening
from tests.sseclient import Response, get, request
from tests.streams import parse, watch

REPO = Path(__file__).resolve().parent.parent
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43,}")
SOME_CID = "6f1e0d4c-1111-4222-8333-944445555666"

# ---------------------------------------------------------------- helpers


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`main(argv, env)` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv), env=env or {})
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command argparse must reject; return its stderr."""
    with pytest.raises(SystemExit) as exc_info:
        main(list(argv), env={})
    assert exc_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err


def db_url(path: Path) -> str:
    return f"sqlite:///{path}"


def rows(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute(sql, params).fetchall())


def authorize(path: Path, token: str, conversation_id: str | None = None) -> Grant:
    async def go() -> Grant:
        store = SQLiteStore(path)
        try:
            return await store.authorize(token, conversation_id)
        finally:
            await store.aclose()

    return trio.run(go)


def the_uuid(out: str) -> str:
    """`out` must be exactly one hyphenated lower-case UUID and a newline."""
    assert out.endswith("\n")
    assert out.count("\n") == 1
    value = out[:-1]
    assert str(uuid.UUID(value)) == value
    return value


def the_token(out: str) -> str:
    assert out.endswith("\n")
    assert out.count("\n") == 1
    assert TOKEN_RE.fullmatch(out[:-1]), out
    return out[:-1]


def subprocess_env() -> dict[str, str]:
    """This environment without any CHATWATCH_* a developer may have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATWATCH_")}


def chatwatch(*argv: str) -> list[str]:
    return [sys.executable, "-m", "app", *argv]


async def run_cli_process(
    *argv: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`chatwatch ARGV` as a subprocess, output captured, with a hang guard."""
    with trio.fail_after(30):
        return await trio.run_process(
            chatwatch(*argv),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
            env=subprocess_env() | (env or {}),
        )


class Lines:
    """Accumulates a subprocess's output; waits for what it must contain."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""

    async def until(self, predicate: Callable[[str], bool], limit: float = 30.0) -> str:
        """The output so far, once `predicate` accepts it; TooSlowError after `limit`."""
        with trio.fail_after(limit):
            while not predicate(self.text):
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"output ended before the condition; got {self.text!r}")
                self.text += data.decode("utf-8", "replace")
        return self.text


# ---------------------------------------------------------------- admin commands


def test_users_add_prints_only_the_new_user_id(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "cli.db"
    code, out, err = run_cli(capsys, "users", "add", "alice", "--database-url", db_url(db))
    assert (code, err) == (0, "")
    user_id = the_uuid(out)
    assert rows(db, "SELECT id, name FROM users") == [(user_id, "alice")]


def test_sessions_create_prints_a_url_safe_token_that_authorizes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "cli.db"
    url = db_url(db)
    user_id = the_uuid(run_cli(capsys, "users", "add", "bob", "--database-url", url)[1])

    code, out, err = run_cli(capsys, "sessions", "create", user_id, "--database-url", url)
    assert (code, err) == (0, "")
    token = the_token(out)
    grant = authorize(db, token)  # a valid session (no conversation asked for)
    assert (grant.access, grant.user_id) == (Access.NOT_FOUND, user_id)
    assert authorize(db, "not-" + token).access is Access.UNAUTHORIZED

    code, out, err = run_cli(
        capsys, "sessions", "create", user_id, "--ttl", "60", "--database-url", url
    )
    assert (code, err) == (0, "")
    short = the_token(out)
    assert short != token
    lifetimes = sorted(
        float(r[0])  # type: ignore[arg-type]
        for r in rows(db, "SELECT expires_at - created_at FROM sessions")
    )
    assert lifetimes == [pytest.approx(60), pytest.approx(DEFAULT_SESSION_TTL)]


def test_sessions_create_rejects_a_ttl_that_is_not_positive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = usage_error(capsys, "sessions", "create", SOME_CID, "--ttl", "0")
    assert "--ttl" in err
    assert "must be > 0" in err


def test_sessions_create_for_an_unknown_user_exits_1_with_a_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "cli.db"
    missing = str(uuid.uuid4())
    code, out, err = run_cli(capsys, "sessions", "create", missing, "--database-url", db_url(db))
    assert code == 1
    assert out == ""
    assert err == f"chatwatch: no such user: {missing}\n"
    assert rows(db, "SELECT * FROM sessions") == []


def test_sessions_revoke_ends_the_session(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "cli.db"
    url = db_url(db)
    user_id = the_uuid(run_cli(capsys, "users", "add", "carol", "--database-url", url)[1])
    token = the_token(run_cli(capsys, "sessions", "create", user_id, "--database-url", url)[1])
    other = the_token(run_cli(capsys, "sessions", "create", user_id, "--database-url", url)[1])

    assert run_cli(capsys, "sessions", "revoke", token, "--database-url", url) == (0, "", "")
    assert authorize(db, token).access is Access.UNAUTHORIZED
    assert authorize(db, other).access is Access.NOT_FOUND  # still a valid session

    code, out, err = run_cli(capsys, "sessions", "revoke", "no-such-token", "--database-url", url)
    assert (code, out) == (1, "")
    assert err == "chatwatch: no such session\n"


def test_conversations_create_prints_an_id_the_owner_may_watch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "cli.db"
    url = db_url(db)
    owner = the_uuid(run_cli(capsys, "users", "add", "dave", "--database-url", url)[1])
    stranger = the_uuid(run_cli(capsys, "users", "add", "eve", "--database-url", url)[1])
    owner_token = the_token(run_cli(capsys, "sessions", "create", owner, "--database-url", url)[1])
    stranger_token = the_token(
        run_cli(capsys, "sessions", "create", stranger, "--database-url", url)[1]
    )

    code, out, err = run_cli(
        capsys, "conversations", "create", "--owner", owner, "--title", "T", "--database-url", url
    )
    assert (code, err) == (0, "")
    cid = the_uuid(out)
    assert rows(db, "SELECT id, owner_id, title FROM conversations") == [(cid, owner, "T")]
    assert authorize(db, owner_token, cid).access is Access.GRANTED
    assert authorize(db, stranger_token, cid).access is Access.NOT_FOUND

    missing = str(uuid.uuid4())
    code, out, err = run_cli(
        capsys, "conversations", "create", "--owner", missing, "--database-url", url
    )
    assert (code, out, err) == (1, "", f"chatwatch: no such user: {missing}\n")


def test_conversations_create_requires_an_owner(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--owner" in usage_error(capsys, "conversations", "create", "--title", "T")


# ---------------------------------------------------------------- environment


def test_admin_commands_read_the_environment_and_the_command_line_wins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env_db, cli_db = tmp_path / "env.db", tmp_path / "cli.db"
    env = {"CHATWATCH_DATABASE_URL": db_url(env_db)}

    from_env = the_uuid(run_cli(capsys, "users", "add", "frank", env=env)[1])
    from_cli = the_uuid(
        run_cli(capsys, "users", "add", "grace", "--database-url", db_url(cli_db), env=env)[1]
    )
    assert rows(env_db, "SELECT id FROM users") == [(from_env,)]
    assert rows(cli_db, "SELECT id FROM users") == [(from_cli,)]

    env |= {"CHATWATCH_OWNER": from_env, "CHATWATCH_TITLE": "env title", "CHATWATCH_TTL": "120"}
    first = the_uuid(run_cli(capsys, "conversations", "create", env=env)[1])
    second = the_uuid(run_cli(capsys, "conversations", "create", "--title", "cli", env=env)[1])
    assert sorted(rows(env_db, "SELECT id, owner_id, title FROM conversations")) == sorted(
        [
            (first, from_env, "env title"),
            (second, from_env, "cli"),
        ]
    )
    the_token(run_cli(capsys, "sessions", "create", from_env, env=env)[1])
    the_token(run_cli(capsys, "sessions", "create", from_env, "--ttl", "30", env=env)[1])
    lifetimes = sorted(
        float(r[0])  # type: ignore[arg-type]
        for r in rows(env_db, "SELECT expires_at - created_at FROM sessions")
    )
    assert lifetimes == [pytest.approx(30), pytest.approx(120)]


# Every command, with what it needs besides options; required options come from env.
COMMANDS: dict[tuple[str, ...], list[str]] = {
    ("serve",): [],
    ("demo",): [],
    ("users", "add"): ["someone"],
    ("sessions", "create"): [SOME_CID],
    ("sessions", "revoke"): ["tok"],
    ("conversations", "create"): [],
    ("publish",): ["chunk", SOME_CID, "{}"],
    ("watch",): [SOME_CID],
}
BASE_ENV = {"CHATWATCH_OWNER": SOME_CID, "CHATWATCH_TOKEN": "tok"}


def _subparser(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> argparse.ArgumentParser:
    for word in words:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[word]
    return parser


def _options() -> list[tuple[tuple[str, ...], argparse.Action]]:
    parser = build_parser({})
    found = []
    for words in COMMANDS:
        for action in _subparser(parser, words)._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.dest in ("help", "version"):
                continue
            found.append((words, action))
    return found


# Options whose values have a shape of their own: two valid values, unlike the default.
VALUES = {
    "--bind": ("127.0.0.1:7", "[::1]:9"),
    "--nats-url": ("nats://a:7", "tls://b:9,ws://c"),
    "--database-url": ("sqlite:///env.db", "cli.db"),
    "--history-replicas": ("3", "5"),
    "--fast-send": ("off", "off"),  # two choices: only one is unlike the default
}


def _two_values(action: argparse.Action) -> tuple[str, str]:
    """Two valid command-line values for `action`, both unlike its default."""
    if action.option_strings[0] in VALUES:
        return VALUES[action.option_strings[0]]
    if action.choices is not None:
        env_value, cli_value = [str(c) for c in action.choices if c != action.default][:2]
        return env_value, cli_value
    if action.type is not None:
        return "7", "9"
    return "from-env", "from-cli"


@pytest.mark.parametrize(
    ("words", "action"),
    _options(),
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.option_strings[0],
)
def test_every_option_reads_its_environment_variable_and_the_command_line_wins(
    words: tuple[str, ...], action: argparse.Action
) -> None:
    flag = action.option_strings[0]
    var = "CHATWATCH_" + flag.removeprefix("--").replace("-", "_").upper()
    env_value, cli_value = _two_values(action)

    def expected(text: str) -> object:
        return action.type(text) if callable(action.type) else text

    argv = [*words, *COMMANDS[words]]
    env = BASE_ENV | {var: env_value}
    from_env, given = parse_args(argv, env)
    assert getattr(from_env, action.dest) == expected(env_value)
    assert given[action.dest] == var  # what an error about it would name
    from_cli, _ = parse_args([*argv, flag, cli_value], env)
    assert getattr(from_cli, action.dest) == expected(cli_value)
    assert f"[env {var}]" in (action.help or "")  # and --help says so


def test_the_option_table_covers_the_documented_variables() -> None:
    names = {a.option_strings[0] for _, a in _options()}
    assert {"--nats-url", "--database-url", "--bind", "--keepalive", "--ttl", "--owner"} <= names


def test_serve_settings_come_from_the_environment() -> None:
    env = {
        "CHATWATCH_NATS_URL": "nats://a:1, nats://b:2",
        "CHATWATCH_KEEPALIVE": "7.5",
        "CHATWATCH_BIND": "127.0.0.1:9999",
        "CHATWATCH_DATABASE_URL": "sqlite:///x.db",
    }
    settings = settings_from(parse_args(["serve"], env)[0])
    assert settings.nats_urls == ("nats://a:1", "nats://b:2")
    assert settings.keepalive == pytest.approx(7.5)
    assert settings.host_port == ("127.0.0.1", 9999)
    assert settings.database_url == "sqlite:///x.db"
    assert settings_from(parse_args(["serve"], {})[0]).nats_urls is None


def test_an_unsupported_database_url_is_a_message_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"CHATWATCH_DATABASE_URL": "mysql://u@db/chat"}
    code, out, err = run_cli(capsys, "users", "add", "x", env=env)
    assert (code, out) == (2, "")
    assert err == ("chatwatch: CHATWATCH_DATABASE_URL: unsupported database URL scheme: mysql\n")


# ---------------------------------------------------------------- publish


def test_publish_with_a_bad_conversation_id_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = usage_error(capsys, "publish", "chunk", "not-a-uuid", "{}")
    assert "not a hyphenated UUID: 'not-a-uuid'" in err
    assert "invalid choice" in usage_error(capsys, "publish", "thing", SOME_CID, "{}")


async def test_publish_to_a_refused_port_says_so_at_once() -> None:
    with closed_port() as port:
        url = f"nats://127.0.0.1:{port}"
        # A long --timeout: the refusal must be reported, not waited out.
        result = await run_cli_process("publish", "chunk", SOME_CID, "{}", "--nats-url", url)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == f"chatwatch: NATS at {url}: connection refused\n"


async def test_publish_to_a_server_that_never_answers_times_out_in_one_line() -> None:
    with socket.socket() as silent:  # accepts (in the kernel's backlog), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        result = await run_cli_process(
            "publish", "chunk", SOME_CID, "{}", "--nats-url", url, "--timeout", "0.5"
        )
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode() == f"chatwatch: NATS at {url} did not answer within 0.5s\n"


async def test_publish_with_invalid_utf8_is_a_usage_error() -> None:
    # What `chatwatch publish chunk ID $'\xff'` passes: bytes that are not UTF-8.
    with trio.fail_after(30):
        result = await trio.run_process(
            [os.fsencode(a) for a in chatwatch("publish", "chunk", SOME_CID)] + [b"\xff"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=subprocess_env(),
        )
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode() == (
        "chatwatch: publish: the payload is not valid UTF-8 (at character 1)\n"
    )


async def test_publish_over_the_servers_max_payload_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 100\n")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    payload = json.dumps({"chunk_type": "token", "text": "x" * 200})
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio.run_process,
                [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        await wait_listening(port, limit=10)
        result = await run_cli_process("publish", "chunk", SOME_CID, payload, "--nats-url", url)
        server.kill()
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode() == (
        f"chatwatch: the payload ({len(payload)} bytes) is larger than the NATS server's "
        "max_payload (100 bytes)\n"
    )


async def test_publish_reaches_a_watcher(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    response = await watch(svc, cid, seed.token)
    payload = json.dumps({"chunk_type": "token", "text": "from the cli"})
    with trio.fail_after(30):
        for kind in ("chunk", "message"):
            result = await run_cli_process(
                "publish", kind, cid, payload, "--nats-url", svc.nats.url
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == b""
        frames = await response.frames_until(count=2)
    assert [parse(f) for f in frames] == [
        ("token", {"chunk_type": "token", "text": "from the cli"}),
        ("message", {"chunk_type": "token", "text": "from the cli"}),
    ]
    await response.aclose()


async def test_publish_reads_the_nats_url_from_the_environment(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    response = await watch(svc, cid, seed.token)
    with trio.fail_after(30):
        result = await run_cli_process(
            "publish",
            "chunk",
            cid,
            '{"chunk_type":"done"}',
            env={"CHATWATCH_NATS_URL": svc.nats.url},
        )
        assert result.returncode == 0, result.stderr
        frame = await response.next_frame()
    assert frame is not None
    assert parse(frame) == ("done", {"chunk_type": "done"})
    await response.aclose()


# ---------------------------------------------------------------- watch


async def start_viewer(svc: Service, seed: Seed, stderr_path: Path) -> trio.Process:
    """`chatwatch watch` on the seed's conversation, its stdout a pipe to read."""
    with stderr_path.open("wb") as stderr:
        return await trio.lowlevel.open_process(
            chatwatch("watch", seed.conversation_id, "--token", seed.token, "--url", svc.url),
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            env=subprocess_env(),
        )


async def test_watch_prints_the_stream_as_it_arrives(svc: Service, tmp_path: Path) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    proc = await start_viewer(svc, seed, tmp_path / "stderr")
    try:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        with trio.fail_after(30):
            # "[live]" is the `:ok`: the subscription is confirmed, nothing is lost now.
            assert await out.until(lambda t: "\n" in t) == "[live]\n"
        pub = await svc.publisher()
        await pub.publish_many(
            [
                (f"chat.chunk.{cid}", chunk("token", text="hello-from-nats")),
                (f"chat.chunk.{cid}", chunk("token", text=" again")),
                (f"chat.chunk.{cid}", chunk("done")),
                (f"chat.message.{cid}", json.dumps({"content": "ok"}).encode()),
            ]
        )
        await pub.aclose()
        with trio.fail_after(10):
            text = await out.until(lambda t: t.endswith('[message] {"content": "ok"}\n'))
        assert text == (
            "[live]\nhello-from-nats again\n[done]\n\n[message] " + '{"content": "ok"}\n'
        )
    finally:
        proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The killed viewer's stream is gone from the service, and so its subscription.
    await wait_until(lambda: svc.nats.chat_subscriptions() == [])


async def test_watch_piped_into_a_reader_that_leaves_ends_without_a_traceback(
    svc: Service, tmp_path: Path
) -> None:
    # `chatwatch watch ... | head -1`: once the reader has gone, the next write fails
    # with EPIPE; the viewer ends as a command killed by SIGPIPE would (141), quietly.
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    proc = await start_viewer(svc, seed, tmp_path / "stderr")
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            assert await Lines(proc.stdout).until(lambda t: "\n" in t) == "[live]\n"
        await proc.stdout.aclose()  # the reader leaves
        pub = await svc.publisher()
        await pub.publish_many([(f"chat.chunk.{cid}", chunk("done"))])
        await pub.aclose()
        with trio.fail_after(30):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
    assert proc.returncode == 128 + signal.SIGPIPE
    assert b"Traceback" not in (tmp_path / "stderr").read_bytes()


async def test_watch_resumes_by_itself_across_a_service_restart(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    """The server's shutdown says `retry:`; the viewer comes back with Last-Event-ID and
    shows what was published while the service was down (history on)."""
    svc = await start_service(nursery, nats, tmp_path, history="on")
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    proc = await trio.lowlevel.open_process(
        chatwatch("watch", cid, "--url", svc.url),
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=subprocess_env() | {"CHATWATCH_TOKEN": seed.token},
    )
    pub = await svc.publisher()
    try:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        with trio.fail_after(30):
            await out.until(lambda t: t == "[live]\n")
        await pub.publish(f"chat.chunk.{cid}", chunk("thinking", text="before-restart"))
        await pub.flush()
        with trio.fail_after(10):
            await out.until(lambda t: "before-restart" in t)
        svc.shutdown.set()
        with trio.fail_after(10):
            await out.until(lambda t: "[reconnecting]" in t)
        await pub.publish(f"chat.chunk.{cid}", chunk("thinking", text="while-down"))
        await pub.flush()
        await start_service(nursery, nats, tmp_path, history="on", bind=f"127.0.0.1:{svc.port}")
        with trio.fail_after(30):
            seen = await out.until(lambda t: "while-down" in t)
        assert seen.count("before-restart") == 1  # resumed: nothing shown twice
    finally:
        await pub.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_watch_with_a_bad_token_exits_1(svc: Service) -> None:
    result = await run_cli_process("watch", SOME_CID, "--token", "nope", "--url", svc.url)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == 'HTTP 401: {"error": "unauthorized"}\n'


async def test_watch_without_a_server_exits_1_with_a_message() -> None:
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}"
        result = await run_cli_process("watch", SOME_CID, "--token", "t", "--url", url)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith(f"chatwatch: {url}/api/ai/conversations/{SOME_CID}/watch: ")
    assert "Traceback" not in err


# ---------------------------------------------------------------- serve and demo


async def test_serve_with_an_unsupported_database_url_fails_cleanly(
    nats: NatsProcess, tmp_path: Path
) -> None:
    result = await run_cli_process(
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--nats-url",
        nats.url,
        "--database-url",
        "mysql://u@db/chat",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "chatwatch: --database-url: unsupported database URL scheme: mysql\n"
    )
    assert list(await trio.Path(tmp_path).iterdir()) == []  # nothing started: no chatwatch.db


async def test_demo_serves_a_logged_in_viewer_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    response: Response | None = None
    proc = await trio.lowlevel.open_process(
        chatwatch("demo", "--bind", "127.0.0.1:0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    try:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        with trio.fail_after(30):
            text = await out.until(lambda t: t.count("\n") >= 2)
        match = re.search(
            r"open (http://127\.0\.0\.1:(\d+)/) \(conversation ([0-9a-f-]{36})\)", text
        )
        assert match, text
        port, cid = int(match[2]), match[3]
        token_match = re.search(r"--token (\S+) --url http://127\.0\.0\.1:\d+", text)
        assert token_match, text
        token = token_match[1]

        with trio.fail_after(10):
            status, headers, body = await get(port, "/")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert f'value="{cid}"' in body.decode()
        cookie = [part.strip() for part in headers["set-cookie"].split(";")]
        assert cookie[0] == f"chatwatch_session={token}"
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(cookie[1:])

        # The cookie the page set is enough to watch, and the simulated run is live.
        response = await request(port, watch_path(cid), cookie=token)
        assert response.status == 200
        with trio.fail_after(20):
            assert await response.next_frame() == b":ok"
            frame = await response.next_frame()
            while frame is not None and frame.startswith(b":"):
                frame = await response.next_frame()
        assert frame is not None
        assert parse(frame)[0] in {"thinking", "tool_call", "tool_result", "token", "done"}

        children = children_of(proc.pid)
        assert children, "the demo runs an embedded nats-server"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            rest = await response.frames_until()
            assert await proc.wait() == 0
        assert b"retry: 1000" in rest
        await wait_until(lambda: not any(is_running(c) for c in children))
    finally:
        if response is not None:
            await response.aclose()  # also when an assertion failed: no socket leaks on
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_tokens_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token is pasted after `sessions revoke`; a leading '-' would read as an option."""
    import secrets

    from app import auth

    draws = iter(["-starts-with-a-dash", "_fine"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert auth.new_token() == "_fine"
