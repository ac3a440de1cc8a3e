"""`chatwatch demo`: the service on embedded defaults, a demo user and conversation,
and a simulated AI run publishing realistic traffic on NATS, forever."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import tempfile
from pathlib import Path

import trio

from app import ids
from app.bus import Bus
from app.config import Settings
from app.http import Demo
from app.service import run
from app.store import open_store

ANSWER = (
    "Structured concurrency means every task has an owner: a nursery that outlives it. "
    "When a viewer leaves, the nursery that fed its stream is cancelled, and with it "
    "every subscription and buffer that stream held. Nothing is left behind."
)
THINKING = [
    "The user asks what structured concurrency buys a streaming gateway.",
    "Look up how cancellation propagates, then answer briefly.",
]


def _chunk(conversation_id: str, chunk_type: str, **fields: object) -> bytes:
    return json.dumps(
        {"chunk_type": chunk_type, "conversation_id": conversation_id, **fields}
    ).encode()


async def simulate(bus: Bus, conversation_id: str, *, speed: float = 1.0) -> None:
    """Publish one realistic AI run after another until cancelled."""
    chunk = ids.chunk_subject(conversation_id)
    run_no = 0
    while True:
        run_no += 1
        for thought in THINKING:
            await bus.publish(chunk, _chunk(conversation_id, "thinking", text=thought))
            await trio.sleep(0.6 / speed)
        call = {
            "id": f"call_{run_no}",
            "name": "search_docs",
            "arguments": {"query": "trio cancellation"},
        }
        await bus.publish(chunk, _chunk(conversation_id, "tool_call", tool_call=call))
        await trio.sleep(0.8 / speed)
        await bus.publish(
            chunk,
            _chunk(
                conversation_id,
                "tool_result",
                tool_call_id=call["id"],
                result="Cancel scopes nest; cancelling one cancels everything inside it.",
            ),
        )
        await trio.sleep(0.3 / speed)
        for word in ANSWER.split(" "):
            await bus.publish(chunk, _chunk(conversation_id, "token", text=word + " "))
            await trio.sleep(random.uniform(0.04, 0.12) / speed)
        await bus.publish(chunk, _chunk(conversation_id, "done", finish_reason="stop"))
        message = {
            "role": "assistant",
            "conversation_id": conversation_id,
            "content": ANSWER,
            "run": run_no,
        }
        await bus.publish(ids.message_subject(conversation_id), json.dumps(message).encode())
        await trio.sleep(3.0 / speed)


async def run_demo(
    settings: Settings, *, print_url: bool = True, listener: socket.socket | None = None
) -> None:
    """Seed a demo user, session and conversation, then serve with the simulation."""
    with tempfile.TemporaryDirectory(prefix="chatwatch-demo-") as tmp:
        db = settings.database_url or f"sqlite:///{Path(tmp) / 'demo.db'}"
        async with open_store(db) as store:
            user = await store.add_user("demo")
            token = await store.create_session(user)
            conversation_id = await store.create_conversation(user, "Demo conversation")
        settings = dataclasses.replace(settings, database_url=db)

        connected = trio.Event()

        async def extra(bus: Bus) -> None:
            await bus.wait_connected()
            connected.set()
            await simulate(bus, conversation_id)

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: run(
                    settings,
                    demo=Demo(token, conversation_id),
                    extra=extra,
                    listener=listener,
                    task_status=task_status,
                )
            )
            # The URL is printed once NATS is there: a viewer opened at once gets `:ok`,
            # not "NATS not available" while the embedded server is still connecting.
            await connected.wait()
            if print_url:
                url = binds[0].rstrip("/") + "/"
                print(f"chatwatch demo: open {url} (conversation {conversation_id})", flush=True)
                print(
                    f"terminal viewer: chatwatch watch {conversation_id} --token {token} "
                    f"--url {binds[0]}",
                    flush=True,
                )
