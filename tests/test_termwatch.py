"""`chatwatch watch`'s rendering: a publisher's bytes are shown, never obeyed.

Pure layer (one SSE line in, text out), so no server: the end-to-end path is in
test_cli.py.
"""

from __future__ import annotations

import io
import json

import pytest
import trio

from app.termwatch import printable, render


def rendered(*events: tuple[str, object]) -> str:
    out = io.StringIO()
    for event, data in events:
        render("data: " + json.dumps({"event": event, "data": data}), out)
    return out.getvalue()


@pytest.mark.parametrize(
    "hostile",
    [
        "\x1b[31mred\x1b[0m",  # colour
        "\x1b]0;pwned\x07",  # window title, BEL-terminated
        "\x1b]2;pwned\x1b\\",  # window title, ST-terminated
        "\x1b]52;c;aGk=\x07",  # clipboard write
        "\x9b31m",  # CSI as a C1 character
        "\x9d0;pwned\x9c",  # OSC as C1
        "\x1bc",  # full reset
        "a\x00b\x07c\x08d\x7fe\x85f",  # NUL, BEL, BS, DEL, NEL
    ],
)
def test_no_control_character_reaches_the_terminal(hostile: str) -> None:
    as_text = rendered(("token", {"text": hostile}), ("error", hostile))
    as_json = rendered(("thinking", {"text": hostile}), (hostile, hostile))
    for text in (as_text, as_json):
        assert not [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    # A title is dropped with its escape, not left as litter. (In JSON the escape is
    # shown as the visible text "\u001b", and so is what follows it.)
    assert "pwned" not in as_text


def test_visible_text_around_escapes_is_kept_and_newlines_stay_newlines() -> None:
    assert printable("\x1b[1mbold\x1b[0m and\tplain") == "bold and\tplain"
    assert printable("one\r\ntwo\rthree\n") == "one\ntwo\nthree\n"


def test_a_lone_surrogate_is_shown_as_a_replacement_character() -> None:
    out = io.StringIO()
    render('data: {"event":"token","data":{"text":"a\\ud800b"}}', out)
    render('data: {"event":"message","data":{"content":"\\udfff"}}', out)
    text = out.getvalue()
    text.encode("utf-8")  # a terminal can be given it (no UnicodeEncodeError)
    assert text == 'a\ufffdb\n[message] {"content": "\ufffd"}\n'


def test_values_are_shown_as_json_never_as_python_reprs() -> None:
    text = rendered(
        ("token", {"text": None}),
        ("token", {"text": {"a": 1}}),
        ("error", {"code": None}),
        ("tool_call", {"ok": True, "x": None}),
    )
    assert "None" not in text
    assert "True" not in text
    assert "'" not in text
    assert text == '{"a": 1}\n[error] {"code": null}\n\n[tool_call] {"ok": true, "x": null}\n'


async def test_a_link_broken_mid_event_resumes_before_that_event() -> None:
    """The id counts only once its event is complete (SSE's rule): the viewer must not
    skip the event it was in the middle of receiving."""
    from app.termwatch import watch

    seen: list[str | None] = []

    async def server(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        headers = dict(
            line.split(": ", 1) for line in request.decode().split("\r\n")[1:] if ": " in line
        )
        seen.append(headers.get("Last-Event-ID"))
        if len(seen) == 1:
            body = (
                b':ok\n\nid: e-1\ndata: {"event":"token","data":{"text":"a"}}\n\n'
                b'id: e-2\ndata: {"event":"tok'
            )
            # Chunked, as chatwatch answers; the link breaks before the last chunk.
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + f"{len(body):x}\r\n".encode()
                + body
                + b"\r\n"
            )
        else:
            await stream.send_all(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(20):
            code = await watch(f"http://127.0.0.1:{port}", "x", "t", out=io.StringIO())
        nursery.cancel_scope.cancel()
    assert code == 1  # the 401 of the second request ends it
    assert seen == [None, "e-1"]
