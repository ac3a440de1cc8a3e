"""What the adapters over hypercorn, h11, Quart and Quart-Trio check before they
replace anything: that the upstream code they mirror is the code they were written
against (`fastsend`, `fastchunk`, `idletask`, `asgiconn`).

A hash of the source, not a version number: a version says which release is
installed, the source says whether the lines an adapter copies its semantics from
are still those lines. Dedented, so a method moved into or out of a class with the
same code still matches.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from collections.abc import Mapping


def source_sha256(obj: object) -> str:
    """sha256 of a function's, method's or class's dedented source."""
    source = textwrap.dedent(inspect.getsource(obj))  # type: ignore[arg-type]
    return hashlib.sha256(source.encode()).hexdigest()


def mismatches(expected: Mapping[str, str], sources: Mapping[str, object]) -> list[str]:
    """The names in `sources` whose source is unreadable or hashes to something else
    than `expected` says."""
    wrong = []
    for name, obj in sources.items():
        try:
            digest: str | None = source_sha256(obj)
        except (OSError, TypeError):
            digest = None  # no source to read (a builtin, a .pyc alone): never a match
        if digest is None or digest != expected.get(name):
            wrong.append(name)
    return wrong
