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
import trio

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


class _TryAgain(Exception):
    def __init__(self, after: float) -> None:
        super().__init__(f"the server is busy; retrying in {after:g} s")
        self.after = after


def _retry_after(value: str | None, default: float) -> float:
    return float(value) if value is not None and value.isdigit() else default


# How long the viewer keeps trying to come back after a dropped connection (a deploy,
# a network blip) before it gives up.
_GIVE_UP_AFTER = 60.0


async def watch(url: str, conversation_id: str, token: str, out: TextIO = sys.stdout) -> int:
    """Stream until the server ends it; return a process exit code.

    A connection that breaks, or a stream the server ends with ``retry:`` (its
    shutdown), is resumed by itself with ``Last-Event-ID``: with history on the server
    replays what was missed, so the text goes on where it stopped.
    """
    target = f"{url.rstrip('/')}/api/ai/conversations/{conversation_id}/watch"
    last_id: str | None = None
    retry = 1.0
    trying_since: float | None = None
    connected_once = False
    while True:
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        asked_to_retry = False
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
                client.stream("GET", target, headers=headers) as response,
            ):
                if response.status_code in (429, 503) and connected_once:
                    # A busy or restarting deployment, after we were watching: wait as
                    # told and try again (within the same patience as a broken link).
                    await response.aread()
                    raise _TryAgain(_retry_after(response.headers.get("Retry-After"), retry))
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")
                    print(f"HTTP {response.status_code}: {printable(body)}", file=sys.stderr)
                    return 1
                trying_since = None
                connected_once = True
                pending_id: str | None = None
                async for line in response.aiter_lines():
                    if line.startswith("id:"):
                        # Taken as the last id only once its event is complete (the
                        # blank line): a link that breaks mid-event resumes before it.
                        pending_id = line[3:].strip() or None
                    elif line == "":
                        if pending_id is not None:
                            last_id, pending_id = pending_id, None
                    elif line.startswith("retry:"):
                        asked_to_retry = True
                        digits = line[6:].strip()
                        retry = int(digits) / 1000 if digits.isdigit() else retry
                    else:
                        render(line, out)
        except (httpx.TransportError, _TryAgain) as exc:
            # Server not reachable, or the connection broke mid-stream: a message, not a
            # traceback; then try again for a while (the server may be restarting).
            wait = exc.after if isinstance(exc, _TryAgain) else retry
            if not connected_once:
                print(f"chatwatch: {target}: {exc}", file=sys.stderr)
                return 1
            now = trio.current_time()
            if trying_since is None:
                trying_since = now
                print(f"chatwatch: {target}: {exc}; reconnecting", file=sys.stderr)
            elif now - trying_since > _GIVE_UP_AFTER:
                print(f"chatwatch: {target}: {exc}; giving up", file=sys.stderr)
                return 1
            await trio.sleep(wait)
            continue
        if not asked_to_retry:
            return 0
        out.write("\n[reconnecting]\n")
        out.flush()
        await trio.sleep(retry)
