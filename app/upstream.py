"""What the adapters over hypercorn, h11, Quart and Quart-Trio check before they
replace anything: that the upstream code they mirror is the code they were written
against (`fastsend`, `fastchunk`, `idletask`, `inbox`, `readloop`, `asgiconn`); and,
for those that replace an upstream attribute in place, the one way they do it
(`Replacement`).

A hash of the source, not a version number: a version says which release is
installed, the source says whether the lines an adapter copies its semantics from
are still those lines. Dedented, so a method moved into or out of a class with the
same code still matches.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import textwrap
from collections.abc import Callable, Mapping
from typing import Any


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


class Replacement:
    """One upstream attribute (a method, or a class a module looks up by name) replaced
    by ours, only while the code it mirrors is the code it was written against.

    `install` refuses, with one warning and upstream untouched, when `check` names
    anything that differs (or when the replacement needs POSIX and this is not), so an
    upgrade costs the saving, never correctness; it is idempotent. `uninstall` puts
    the original back (tests and measurements). `original` is what the replacement
    falls back on; it is set exactly while the replacement is in place.
    """

    __slots__ = ("_check", "_log", "_name", "_owner", "_posix", "_replacement", "original")

    def __init__(
        self,
        log: logging.Logger,
        owner: object,
        name: str,
        replacement: object,
        check: Callable[[], list[str]],
        *,
        posix_only: bool = False,
    ) -> None:
        self._log = log
        self._owner = owner
        self._name = name
        self._replacement = replacement
        self._check = check
        self._posix = posix_only
        self.original: Any = None

    def installed(self) -> bool:
        return self.original is not None

    def install(self) -> bool:
        """Put the replacement in place once; True when it is."""
        if self.original is not None:
            return True
        if self._posix and os.name != "posix":
            self._log.warning(
                "left off: it writes to sockets with os calls (POSIX), not on %s", os.name
            )
            return False
        wrong = self._check()
        if wrong:
            self._log.warning(
                "left off: %s not the one this adapter mirrors (source sha256)", ", ".join(wrong)
            )
            return False
        self.original = getattr(self._owner, self._name)
        setattr(self._owner, self._name, self._replacement)
        return True

    def uninstall(self) -> None:
        """Put upstream's attribute back."""
        if self.original is not None:
            setattr(self._owner, self._name, self.original)
            self.original = None
