"""`serve --workers N`: one socket bound by the parent, inherited by the workers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from app.store import SQLiteStore
from tests.conftest import watch_path
from tests.natsproc import NatsProcess
from tests.polling import poll_until
from tests.served import served
from tests.sseclient import request
from tests.streams import metrics, until_ok


async def test_a_second_deployment_on_the_same_port_fails_and_the_first_keeps_it(
    nats: NatsProcess, tmp_path: Path
) -> None:
    async with served(nats, tmp_path, "--workers", "2") as first:
        other = tmp_path / "other"
        await trio.Path(other).mkdir()
        store = SQLiteStore(other / "other.db")
        user = await store.add_user("intruder")
        other_token = await store.create_session(user)
        await store.aclose()
        with trio.fail_after(30):
            second = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "app",
                    "serve",
                    "--workers",
                    "2",
                    "--bind",
                    f"127.0.0.1:{first.port}",
                    "--nats-url",
                    nats.url,
                    "--database-url",
                    f"sqlite:///{other / 'other.db'}",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=other,
            )
        assert second.returncode == 2
        assert second.stderr.decode() == (
            f"chatwatch: --bind 127.0.0.1:{first.port}: address already in use\n"
        )
        # Every request reaches the first deployment: its token always works, the
        # other's never does.
        for _ in range(20):
            with trio.fail_after(10):
                ours = await request(first.port, watch_path(first.cids[0]), token=first.token)
                assert ours.status == 200
                await ours.aclose()
                theirs = await request(first.port, watch_path(first.cids[0]), token=other_token)
                assert theirs.status == 401
                await theirs.aclose()


async def test_worker_logs_name_the_worker(nats: NatsProcess, tmp_path: Path) -> None:
    async with served(nats, tmp_path, "--workers", "2") as srv:
        assert srv.log is not None
        log = srv.log

        async def both_serving() -> bool:
            text = await trio.Path(log).read_text()
            return all(f"worker {n} chatwatch: serving on" in text for n in (1, 2))

        await poll_until(both_serving, limit=15)


async def test_metrics_are_the_sum_over_workers_whichever_answers(
    nats: NatsProcess, tmp_path: Path
) -> None:
    """A scrape reaches one worker at random; each answers for all of them."""
    async with served(nats, tmp_path, "--workers", "2") as srv:
        streams = []
        try:
            with trio.fail_after(30):
                for i in range(12):
                    s = await request(srv.port, watch_path(srv.cids[i % 4]), token=srv.token)
                    assert s.status == 200
                    streams.append(s)
                    await until_ok(s)

                # The worker that answers each scrape is whichever accepts it; poll
                # until both have answered with the sum. Each has fewer than 12 of the
                # streams of its own (or none), so only the sum shows 12; the other's
                # numbers reach a worker within a snapshot period (1 s).
                latest: dict[str, str] = {}

                async def both_sum() -> bool:
                    text = await metrics(srv.port)
                    found = re.search(r'^chatwatch_worker\{worker="(\d+)"\} 1\.0$', text, re.M)
                    assert found, text
                    latest[found[1]] = text
                    return sorted(latest) == ["1", "2"] and all(
                        "chatwatch_watchers 12.0" in t and "chatwatch_workers 2.0" in t
                        for t in latest.values()
                    )

                await poll_until(both_sum, limit=30)
        finally:
            for s in streams:
                await s.aclose()
