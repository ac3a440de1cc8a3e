"""The viewer page at `/`, in a real headless Chromium driven by Playwright.

Playwright's sync API cannot run inside trio, so each test runs one browser session
in a worker thread (`trio.to_thread.run_sync`); the steps that need trio (waiting for
the NATS subscription, publishing) call back into trio with `trio.from_thread.run`.
Every Playwright wait has its own timeout; the browser is closed in a `finally`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Dialog, Page, expect, sync_playwright

from app.http import Demo
from app.store import SQLiteStore
from tests.conftest import Service, chunk, start_service, wait_until
from tests.natsproc import NatsProcess
from tests.rawnats import RawNats
from tests.sseclient import request

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def _chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            "chromium not found at /usr/bin/chromium: "
            "install Debian's chromium to run the viewer test"
        )


def _browse(script: Callable[[Page], None], cookie: tuple[str, str] | None) -> list[str]:
    """Run `script` on a fresh page (worker thread); return the dialogs it raised.

    `cookie` is (base URL, token): set as `chatwatch_session` before the page opens.
    """
    # trio-asyncio (imported by the service) installs an event-loop policy whose
    # new_event_loop() outside trio is a trio-asyncio "sync loop", which Playwright
    # refuses ("Sync API inside the asyncio loop"). Outside trio the policy can be
    # set per thread: this worker thread gets plain asyncio, and is reset after.
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    dialogs: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                context = browser.new_context()
                if cookie is not None:
                    url, token = cookie
                    context.add_cookies([{"name": "chatwatch_session", "value": token, "url": url}])
                page = context.new_page()
                page.set_default_timeout(TIMEOUT_MS)

                def on_dialog(dialog: Dialog) -> None:
                    dialogs.append(dialog.message)
                    dialog.dismiss()

                page.on("dialog", on_dialog)
                script(page)
            finally:
                browser.close()
    finally:
        asyncio.set_event_loop_policy(None)
    return dialogs


async def browse(
    script: Callable[[Page], None], cookie: tuple[str, str] | None = None
) -> list[str]:
    return await trio.to_thread.run_sync(partial(_browse, script, cookie))


async def publish_when_subscribed(
    nats: NatsProcess, conversation_id: str, items: list[tuple[str, bytes]]
) -> None:
    """Wait until the page's stream is subscribed on the NATS server, then publish."""
    with trio.fail_after(10):
        await wait_until(lambda: nats.chat_subscriptions() == [f"chat.*.{conversation_id}"])
        pub = await RawNats.connect(nats.client_port)
        try:
            await pub.publish_many(items)
            await pub.flush()
        finally:
            await pub.aclose()


async def publish_now(nats: NatsProcess, items: list[tuple[str, bytes]]) -> None:
    with trio.fail_after(10):
        pub = await RawNats.connect(nats.client_port)
        try:
            await pub.publish_many(items)
            await pub.flush()
        finally:
            await pub.aclose()


def sync_publish(nats: NatsProcess, conversation_id: str, items: list[tuple[str, bytes]]) -> None:
    """From the browser thread: publish on trio's side and wait for it."""
    trio.from_thread.run(publish_when_subscribed, nats, conversation_id, items)


async def test_viewer_shows_a_published_token_live(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id

    def script(page: Page) -> None:
        page.goto(f"{svc.url}/?conversation={cid}")
        status = page.locator("#status")
        expect(status).to_have_text("connected", timeout=TIMEOUT_MS)
        expect(page.locator("#log")).to_be_empty()
        sync_publish(svc.nats, cid, [(f"chat.chunk.{cid}", chunk("token", text="hello-from-nats"))])
        expect(status).to_have_text("live", timeout=TIMEOUT_MS)
        expect(page.locator("#log .answer")).to_have_text("hello-from-nats", timeout=TIMEOUT_MS)
        # Tokens of one answer accumulate in one entry; a message starts another.
        sync_publish(
            svc.nats,
            cid,
            [
                (f"chat.chunk.{cid}", chunk("token", text=" and more")),
                (f"chat.message.{cid}", json.dumps({"content": "final answer"}).encode()),
            ],
        )
        expect(page.locator("#log .message")).to_have_text(
            "message: final answer", timeout=TIMEOUT_MS
        )
        expect(page.locator("#log .answer")).to_have_text(
            "hello-from-nats and more", timeout=TIMEOUT_MS
        )
        assert page.locator("#cid").input_value() == cid

    assert await browse(script, cookie=(svc.url, seed.token)) == []


async def test_viewer_shows_payloads_as_text_never_as_html(svc: Service) -> None:
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    items = [
        (f"chat.chunk.{cid}", chunk("thinking", text=XSS)),
        (f"chat.chunk.{cid}", chunk("tool_result", tool_call_id="c1", result=XSS)),
        (f"chat.chunk.{cid}", chunk(XSS, text=XSS)),
        (f"chat.message.{cid}", json.dumps({"content": XSS}).encode()),
        (f"chat.chunk.{cid}", chunk("token", text=XSS)),
    ]

    def script(page: Page) -> None:
        page.goto(f"{svc.url}/?conversation={cid}")
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
        sync_publish(svc.nats, cid, items)
        # The last one published is shown: so are the others (one stream, in order).
        expect(page.locator("#log .answer")).to_have_text(XSS, timeout=TIMEOUT_MS)
        expect(page.locator("#log .entry")).to_have_count(len(items), timeout=TIMEOUT_MS)
        expect(page.locator("#log .thinking")).to_have_text(XSS)
        expect(page.locator("#log .message")).to_have_text(f"message: {XSS}")
        assert page.locator("img").count() == 0
        assert page.locator("[onerror]").count() == 0
        assert XSS in (page.locator("#log").text_content() or "")

    assert await browse(script, cookie=(svc.url, seed.token)) == []


async def test_viewer_without_a_session_says_so(svc: Service) -> None:
    (seed,) = await svc.seed()

    def script(page: Page) -> None:
        page.goto(f"{svc.url}/?conversation={seed.conversation_id}")
        # A 401 fails the EventSource for good: no reconnect loop, and the page says why.
        expect(page.locator("#status")).to_have_text("closed: not signed in", timeout=TIMEOUT_MS)
        expect(page.locator("#status")).to_have_class("error")

    assert await browse(script) == []
    assert await svc.nats.chat_subscriptions_async() == []


async def test_viewer_with_an_unknown_conversation_says_not_found(svc: Service) -> None:
    (seed,) = await svc.seed()
    missing = str(uuid.uuid4())

    def script(page: Page) -> None:
        page.goto(f"{svc.url}/?conversation={missing}")
        expect(page.locator("#status")).to_have_text(
            "closed: conversation not found", timeout=TIMEOUT_MS
        )

    assert await browse(script, cookie=(svc.url, seed.token)) == []


async def test_demo_page_with_a_stale_conversation_watches_the_current_one(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    # A bookmark of a previous demo run: its conversation is gone after a restart.
    stale = str(uuid.uuid4())
    store = SQLiteStore(tmp_path / "chatwatch.db")  # start_service's database
    try:
        user = await store.add_user("demo")
        token = await store.create_session(user)
        cid = await store.create_conversation(user, "Demo conversation")
    finally:
        await store.aclose()
    svc = await start_service(nursery, nats, tmp_path, demo=Demo(token, cid))

    def script(page: Page) -> None:
        page.goto(f"{svc.url}/?conversation={stale}")
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
        assert page.locator("#cid").input_value() == cid
        assert page.url.endswith(f"?conversation={cid}")
        expect(page.locator("#log .error")).to_have_text(
            f"conversation {stale} not found; watching {cid} instead"
        )
        sync_publish(nats, cid, [(f"chat.chunk.{cid}", chunk("token", text="current-run"))])
        expect(page.locator("#log .answer")).to_have_text("current-run", timeout=TIMEOUT_MS)

    assert await browse(script) == []
    await svc.store.aclose()


async def test_demo_page_logs_the_browser_in_and_prefills_the_conversation(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "chatwatch.db")  # start_service's database
    try:
        user = await store.add_user("demo")
        token = await store.create_session(user)
        cid = await store.create_conversation(user, "Demo conversation")
    finally:
        await store.aclose()
    svc = await start_service(nursery, nats, tmp_path, demo=Demo(token, cid))
    url = svc.url

    def script(page: Page) -> None:
        page.goto(f"{url}/")  # no cookie set by the test, no ?conversation=
        assert page.locator("#cid").input_value() == cid
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
        sync_publish(nats, cid, [(f"chat.chunk.{cid}", chunk("token", text="demo-live"))])
        expect(page.locator("#status")).to_have_text("live", timeout=TIMEOUT_MS)
        expect(page.locator("#log .answer")).to_have_text("demo-live", timeout=TIMEOUT_MS)
        cookies = page.context.cookies()
        assert [(c["name"], c["value"], c["httpOnly"]) for c in cookies] == [
            ("chatwatch_session", token, True)
        ]

    assert await browse(script) == []
    await svc.store.aclose()


async def test_viewer_joining_mid_answer_shows_the_answer_from_its_start(
    nursery: trio.Nursery, nats: NatsProcess, tmp_path: Path
) -> None:
    """History on: a page opened in the middle of an answer shows it from its first
    token (late join), then the rest live, each part once."""
    svc = await start_service(nursery, nats, tmp_path, history="on")
    (seed,) = await svc.seed()
    cid = seed.conversation_id
    # A live-only witness proves the first half is stored before the page opens.
    with trio.fail_after(10):
        witness = await request(
            svc.port,
            f"/api/ai/conversations/{cid}/watch?live_only=1",
            token=seed.token,
        )
        assert await witness.next_frame() == b":ok"
        pub = await RawNats.connect(nats.client_port)
        await pub.publish_many(
            [
                (f"chat.message.{cid}", json.dumps({"content": "an earlier answer"}).encode()),
                (f"chat.chunk.{cid}", chunk("token", text="first half")),
            ]
        )
        await pub.flush()
        for _ in range(2):
            assert await witness.next_frame() is not None
        await witness.aclose()
        await pub.aclose()

    def script(page: Page) -> None:
        page.goto(f"{svc.url}/?conversation={cid}")
        expect(page.locator("#log .answer")).to_have_text("first half", timeout=TIMEOUT_MS)
        # Only the answer in progress: the earlier message is not replayed.
        expect(page.locator("#log .message")).to_have_count(0)
        # The page shows the replay, so its subscription is live: publish now.
        trio.from_thread.run(
            publish_now, nats, [(f"chat.chunk.{cid}", chunk("token", text=", second half"))]
        )
        expect(page.locator("#log .answer")).to_have_text(
            "first half, second half", timeout=TIMEOUT_MS
        )

    assert await browse(script, cookie=(svc.url, seed.token)) == []
    await svc.store.aclose()
    svc.shutdown.set()
