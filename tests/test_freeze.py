"""`gc.freeze()` runs after every import, before serving: the collector's scheduled
full collections must not walk Quart's, hypercorn's and jinja2's module objects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Replaces trio.run (the start of serving) with a report of what the collector tracks.
SCRIPT = """
import gc, sys, trio
from app import cli

def report(*args, **kwargs):
    import hypercorn.trio, jinja2, quart.app
    tracked = {id(o) for o in gc.get_objects()}
    seen = [m.__name__ for m in (quart.app, hypercorn.trio, jinja2) if id(vars(m)) in tracked]
    print("frozen" if gc.get_freeze_count() and not seen else f"tracked: {seen}")
    sys.stdout.flush()
    import os
    os._exit(0)

trio.run = report
cli.main([sys.argv[1], "--bind", "127.0.0.1:0", "--nats-url", "nats://127.0.0.1:1"])
"""


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_modules_are_frozen_before_serving(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert (result.stdout, result.returncode) == ("frozen\n", 0), result.stderr
