"""What every method-replacing adapter promises: it refuses upstream code it does not
know (a warning, upstream untouched), installs once, and uninstalls to the original."""

from __future__ import annotations

import logging
from types import ModuleType

import pytest
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import tcp_server
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer

from app import fastchunk, fastsend, idletask, inbox, readloop, upstream

# (adapter, what holds the attribute it replaces, the attribute, its logger)
ADAPTERS = [
    (fastsend, TCPServer, "protocol_send", "chatwatch.fastsend"),
    (fastchunk, H11Protocol, "stream_send", "chatwatch.fastchunk"),
    (inbox, TaskGroup, "spawn_app", "chatwatch.inbox"),
    (readloop, TCPServer, "_read_data", "chatwatch.readloop"),
    (idletask, tcp_server, "TrioSingleTask", "chatwatch.idletask"),
]
IDS = ["fastsend", "fastchunk", "inbox", "readloop", "idletask"]


@pytest.mark.parametrize(("adapter", "owner", "method", "logger"), ADAPTERS, ids=IDS)
def test_install_refuses_code_it_does_not_know(
    adapter: ModuleType,
    owner: object,
    method: str,
    logger: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter.uninstall()

    async def changed_upstream(self: object, event: object) -> None:
        del self, event

    monkeypatch.setattr(owner, method, changed_upstream)
    with caplog.at_level(logging.WARNING, logger):
        assert not adapter.install()
    assert getattr(owner, method) is changed_upstream
    assert not adapter.installed()
    assert "not the one this adapter mirrors" in caplog.text


@pytest.mark.parametrize(("adapter", "owner", "method", "logger"), ADAPTERS, ids=IDS)
def test_install_is_idempotent_and_uninstall_restores(
    adapter: ModuleType, owner: object, method: str, logger: str
) -> None:
    del logger
    adapter.uninstall()
    original = getattr(owner, method)
    assert adapter.install()
    replaced = getattr(owner, method)
    assert replaced is not original
    assert adapter.install()
    assert getattr(owner, method) is replaced
    adapter.uninstall()
    assert getattr(owner, method) is original


def test_mismatches_names_changed_and_unreadable_sources() -> None:
    def known() -> int:
        return 1

    expected = {"known": upstream.source_sha256(known), "changed": "0" * 64, "builtin": ""}
    sources: dict[str, object] = {"known": known, "changed": known, "builtin": len}
    assert upstream.mismatches(expected, sources) == ["changed", "builtin"]
