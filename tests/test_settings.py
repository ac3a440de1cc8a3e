"""Bad settings: one line naming the setting as the user gave it, exit 2, nothing
started. In-process (`app.cli.main`): every check here runs before `trio.run`."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from app import config, embedded
from app.cli import main, parse_args, settings_from
from app.config import Settings


def one_line_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str] | None = None
) -> str:
    """Run `argv`; it must exit 2 with exactly one line on stderr; return that line."""
    try:
        code = main(argv, env=env or {})
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert "_number" not in err  # never an internal function name
    return err.rstrip("\n")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the embedded nats-server was started before the bind")

    monkeypatch.setattr(embedded, "serve_nats", refuse)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--bind", "junk"], "chatwatch: --bind: not HOST:PORT: 'junk'"),
        (
            ["--bind", "127.0.0.1:99999"],
            "chatwatch: --bind: port out of range (0-65535): '127.0.0.1:99999'",
        ),
        (["--write-timeout", "1e12"], "chatwatch: --write-timeout: must be <= 2147483, got '1e12'"),
        (["--keepalive", "nan"], "chatwatch: --keepalive: not a finite number: 'nan'"),
        (["--keepalive", "abc"], "chatwatch: --keepalive: not a number: 'abc'"),
        (["--workers", "65"], "chatwatch: --workers: must be <= 64, got '65'"),
        (
            ["--nats-url", "http://h:4222"],
            "chatwatch: --nats-url: not a NATS URL (nats://HOST:PORT, or tls, ws, wss): "
            "'http://h:4222'",
        ),
        (["--nats-url", "nats://h:99999"], "chatwatch: --nats-url: bad port in 'nats://h:99999'"),
        (["--nats-url", "nats://:4222"], "chatwatch: --nats-url: no host in 'nats://:4222'"),
        (
            ["--history-stream", "a.b"],
            "chatwatch: --history-stream: a JetStream stream name is letters, digits, - and _: "
            "'a.b'",
        ),
        (["--history-replicas", "6"], "chatwatch: --history-replicas: must be <= 5, got '6'"),
        (["--history-max-age", "-1"], "chatwatch: --history-max-age: must be >= 0, got '-1'"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_bad_flag_is_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str], command: str, argv: list[str], line: str
) -> None:
    assert one_line_usage_error(capsys, [command, *argv]) == line


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"CHATWATCH_KEEPALIVE": "abc"}, "chatwatch: CHATWATCH_KEEPALIVE: not a number: 'abc'"),
        (
            {"CHATWATCH_LOG_LEVEL": "verbose"},
            "chatwatch: CHATWATCH_LOG_LEVEL: must be one of debug, info, warning, error, "
            "got 'verbose'",
        ),
        (
            {"CHATWATCH_WRITE_TIMEOUT": "1e12"},
            "chatwatch: CHATWATCH_WRITE_TIMEOUT: must be <= 2147483, got '1e12'",
        ),
        ({"CHATWATCH_WORKERS": "0"}, "chatwatch: CHATWATCH_WORKERS: must be >= 1, got '0'"),
        (
            {"CHATWATCH_NATS_URL": "nats://ok:1,nats://h:x"},
            "chatwatch: CHATWATCH_NATS_URL: bad port in 'nats://h:x'",
        ),
        (
            {"CHATWATCH_HISTORY": "yes"},
            "chatwatch: CHATWATCH_HISTORY: must be one of auto, on, off, got 'yes'",
        ),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], line: str
) -> None:
    assert one_line_usage_error(capsys, ["serve"], env) == line


def test_an_environment_value_for_another_command_is_not_checked() -> None:
    # CHATWATCH_KEEPALIVE is serve's; `users add` must not trip over it.
    args, given = parse_args(["users", "add", "x"], {"CHATWATCH_KEEPALIVE": "abc"})
    assert (args.name, given) == ("x", {})


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize("from_env", [False, True])
def test_a_port_in_use_is_one_line_and_nothing_is_started(
    capsys: pytest.CaptureFixture[str], taken_port: int, command: str, from_env: bool
) -> None:
    bind = f"127.0.0.1:{taken_port}"
    argv, env = (
        ([command], {"CHATWATCH_BIND": bind}) if from_env else ([command, "--bind", bind], {})
    )
    name = "CHATWATCH_BIND" if from_env else "--bind"
    workers = ["--workers", "2"] if command == "serve" else []
    line = one_line_usage_error(capsys, [*argv, *workers], env)
    assert line == f"chatwatch: {name} {bind}: address already in use"


def test_demo_says_it_ignores_workers(
    capsys: pytest.CaptureFixture[str], taken_port: int, nothing_starts: None
) -> None:
    main(["demo", "--bind", f"127.0.0.1:{taken_port}", "--workers", "3"], env={})
    err = capsys.readouterr().err
    assert err.startswith("chatwatch demo: --workers ignored: the demo is one process\n")


def test_every_setting_has_a_flag_and_the_defaults_are_the_dataclass_ones() -> None:
    args, _ = parse_args(["serve"], {})
    assert settings_from(args) == Settings()
    flags = {config.flag_of(f) for f, _ in config.options()}
    assert {
        "--history",
        "--history-stream",
        "--history-max-age",
        "--history-max-per-conversation",
        "--history-replicas",
        "--replay-cap",
    } <= flags


def test_history_settings_parse() -> None:
    args, _ = parse_args(
        [
            "demo",
            "--history",
            "on",
            "--history-stream",
            "MY_chat-1",
            "--history-max-age",
            "0",
            "--history-max-per-conversation",
            "50",
            "--history-replicas",
            "3",
            "--replay-cap",
            "100",
        ],
        {},
    )
    s = settings_from(args)
    assert (s.history, s.history_stream, s.history_max_age) == ("on", "MY_chat-1", 0.0)
    assert (s.history_max_per_conversation, s.history_replicas, s.replay_cap) == (50, 3, 100)


def test_settings_travel_whole_to_a_worker() -> None:
    s = Settings(nats_urls=("nats://a:1", "tls://b:2"), history="off", workers=3)
    assert Settings.from_json(s.to_json()) == s


def test_workers_auto_is_one_per_core_this_process_may_use() -> None:
    import os

    from app.config import MAX_WORKERS, worker_count

    assert worker_count("auto") == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert worker_count("3") == 3
