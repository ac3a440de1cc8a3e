"""A throwaway PostgreSQL for the test session: initdb + pg_ctl on a free port.

Like `natsproc`, sync and shared by the whole session; `stop()` and `start()` keep the
data directory and the port, so a test can take the server down and bring it back
under a running chatwatch. Each test gets a database of its own (`new_database`).

The binaries come from Debian's `postgresql` package (`.ci/run` installs it); where
they are missing the tests that need them skip and say so. PostgreSQL refuses to run
as root, so as root the server runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import trio

from tests.ports import free_port

_USER = "chatwatch"


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are, or None: the newest Debian install, else PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).resolve().parent
    return None


def missing_reason() -> str | None:
    """Why a throwaway PostgreSQL cannot run here, or None when it can."""
    if postgres_bindir() is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


class PostgresProcess:
    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError(missing_reason())
        self._bin = bindir
        self._dir = Path(tempfile.mkdtemp(prefix="chatwatch-test-pg-"))
        self._data = self._dir / "data"
        self._sockets = self._dir / "sock"
        self.port = -1
        self._initialized = False
        self._as: list[str] = []
        if os.geteuid() == 0:
            postgres = pwd.getpwnam("postgres")
            os.chown(self._dir, postgres.pw_uid, postgres.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}")

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return (self._data / "postmaster.pid").exists()

    def start(self) -> None:
        """Start (the first time: create the cluster); blocks until it accepts queries."""
        if not self._initialized:
            self._run(
                str(self._bin / "initdb"),
                "-D",
                str(self._data),
                "-U",
                _USER,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            self._run("mkdir", "-p", str(self._sockets))
            self._initialized = True
        for _attempt in range(5):
            port = self.port if self.port > 0 else free_port()
            try:
                self._run(
                    str(self._bin / "pg_ctl"),
                    "-D",
                    str(self._data),
                    "-l",
                    str(self._dir / "log"),
                    "-w",
                    "-t",
                    "30",
                    "-o",
                    f"-p {port} -k {self._sockets} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c max_connections=200",
                    "start",
                )
            except RuntimeError:
                if self.port > 0:  # a restart must keep its port: no retry elsewhere
                    raise
                continue  # the free port was taken meanwhile
            self.port = port
            return
        raise RuntimeError("PostgreSQL did not start on a free port")

    def stop(self) -> None:
        """Stop at once (`-m fast`: clients are disconnected); the data stays."""
        if self.running:
            self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def new_database(self) -> str:
        """A new empty database; its URL. Blocking: never on a trio thread."""
        if trio.lowlevel.in_trio_run():
            raise RuntimeError("PostgresProcess.new_database blocks: use new_database_async")
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url_for(name)

    async def new_database_async(self) -> str:
        return await trio.to_thread.run_sync(self.new_database)
