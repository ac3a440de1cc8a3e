"""Run a test module's tests with one of the app's adapters over upstream code in place
and without it: both must behave the same (the adapters are `app.upstream.Replacement`s)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest


class Adapter(Protocol):
    def install(self) -> bool: ...

    def uninstall(self) -> None: ...


def both_ways(adapter: Adapter, name: str, on: str = "adapter") -> Callable[..., Any]:
    """A fixture called `name`, parametrized ``on`` (installed) and "hypercorn"
    (upstream's own code); it uninstalls the adapter afterwards either way."""

    @pytest.fixture(params=[on, "hypercorn"], name=name)
    def fixture(request: pytest.FixtureRequest) -> Iterator[str]:
        adapter.uninstall()
        if request.param == on:
            assert adapter.install()
        yield request.param
        adapter.uninstall()

    return fixture
