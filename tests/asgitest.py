"""Shared by the tests of the request-handling adapters (app/asgiconn.py and
app/inbox.py): the marker for tests that need the lean handling on, and a request
scope as hypercorn builds one."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import pytest

from app import asgiconn

_INSTALLED = ", ".join(f"{name} {version(name)}" for name in asgiconn.MIRRORED)
_MIRRORED = ", ".join(f"{name} {v}" for name, v in asgiconn.MIRRORED.items())
# Where the adapter is off (quart-trio 0.13, which Python 3.13 installs), the app runs
# quart-trio's own request handling and these tests of the adapter have nothing to run;
# test_asgiconn's test_upstream_is_the_version_mirrored checks that it is off there.
lean_only = pytest.mark.skipif(
    not asgiconn.is_supported(),
    reason=f"app/asgiconn.py is off with {_INSTALLED} (it mirrors {_MIRRORED});"
    " the app uses quart-trio's own request handling here",
)


def get_scope(path: str) -> dict[str, Any]:
    """The ASGI scope of ``GET path`` over HTTP/1.1, as hypercorn builds it."""
    return {
        "type": "http",
        "http_version": "1.1",
        "asgi": {"spec_version": "2.1", "version": "3.0"},
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "extensions": {},
    }
