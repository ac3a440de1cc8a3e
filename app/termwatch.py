"""`chatwatch watch`: a terminal viewer of one stream (a plain SSE client)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import httpx


def render(line: str, out: TextIO) -> None:
    """Print one SSE line the way a person wants to read a conversation."""
    if line == ":ok":
        out.write("[live]\n")
    elif line.startswith(":"):
        return
    elif line.startswith("data:"):
        try:
            frame = json.loads(line[5:])
            event, data = frame["event"], frame["data"]
        except (ValueError, KeyError, TypeError):
            out.write(line + "\n")
            return
        if event == "token" and isinstance(data, dict):
            out.write(str(data.get("text", "")))
        elif event == "error":
            out.write(f"\n[error] {data}\n")
        elif event == "done":
            out.write("\n[done]\n")
        else:
            out.write(f"\n[{event}] {json.dumps(data, ensure_ascii=False)}\n")
    out.flush()


async def watch(url: str, conversation_id: str, token: str, out: TextIO = sys.stdout) -> int:
    """Stream until the server ends it; return a process exit code."""
    target = f"{url.rstrip('/')}/api/ai/conversations/{conversation_id}/watch"
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
            client.stream("GET", target, headers=headers) as response,
        ):
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                print(f"HTTP {response.status_code}: {body}", file=sys.stderr)
                return 1
            async for line in response.aiter_lines():
                render(line, out)
    except httpx.TransportError as exc:
        # Server not reachable, or the connection broke mid-stream: a message, not a
        # traceback.
        print(f"chatwatch: {target}: {exc}", file=sys.stderr)
        return 1
    return 0
