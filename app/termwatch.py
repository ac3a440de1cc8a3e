"""`chatwatch watch`: a terminal viewer of one stream (a plain SSE client).

Everything printed comes from a publisher we do not trust: it is shown as text, never
as terminal commands (see `printable`), and values are shown as JSON, never as
Python reprs, so that what a person reads is what was published.
"""

from __future__ import annotations

import json
import re
import sys
from typing import TextIO

import httpx

# ESC sequences as terminals parse them: CSI (colours, cursor), OSC/DCS/PM/APC/SOS
# strings (window title, clipboard) up to BEL or ST, and two-byte escapes. Removed
# whole, so that no parameter bytes are left behind as litter.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]?"  # other escapes (and a lone ESC)
    r"|[\x90\x9b\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # their C1 forms
)
# What is left that a terminal would act on: C0 except tab and newline, DEL, C1.
# A lone surrogate (valid in JSON, not encodable) becomes U+FFFD: writing it would
# raise UnicodeEncodeError.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` without anything a terminal would interpret; CR LF and CR become LF."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ESCAPES.sub("", text)
    text = _CONTROLS.sub("", text)
    return _SURROGATES.sub("\ufffd", text)


def _as_text(value: object) -> str:
    """A string as itself, anything else as JSON (never a Python repr)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


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
            out.write(printable(line) + "\n")
            out.flush()
            return
        if event == "token" and isinstance(data, dict):
            text = data.get("text")
            out.write(printable(_as_text(text)) if text is not None else "")
        elif event == "error":
            out.write(f"\n[error] {printable(_as_text(data))}\n")
        elif event == "done":
            out.write("\n[done]\n")
        else:
            out.write(f"\n[{printable(_as_text(event))}] {printable(_as_text(data))}\n")
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
                print(f"HTTP {response.status_code}: {printable(body)}", file=sys.stderr)
                return 1
            async for line in response.aiter_lines():
                render(line, out)
    except httpx.TransportError as exc:
        # Server not reachable, or the connection broke mid-stream: a message, not a
        # traceback.
        print(f"chatwatch: {target}: {exc}", file=sys.stderr)
        return 1
    return 0
