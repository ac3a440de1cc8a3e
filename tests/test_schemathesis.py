"""schemathesis against /openapi.json of the running service: no 5xx, every response
as documented, undeclared methods answered 405 with Allow."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from tests.conftest import Service


async def test_schemathesis_finds_nothing(svc: Service, tmp_path: Path) -> None:
    # Installed by the test extra, next to this interpreter.
    cli = str(Path(sys.executable).parent / "schemathesis")
    (seed,) = await svc.seed()
    with trio.fail_after(600):  # a hang guard only
        result = await trio.run_process(
            [
                cli,
                "run",
                f"{svc.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "60",
                "--request-timeout",
                "5",
                "--no-color",
                "-H",
                f"Authorization: Bearer {seed.token}",
                "--seed",
                "1",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
        )
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "failure" not in out.rsplit("SUMMARY", 1)[-1].split("Warnings")[0], out
