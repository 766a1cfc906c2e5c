"""Fault modes: what a broken or hostile backend does, on demand.

``FAULTS`` names them (the package docstring says what each does). The ones
that answer before any token are played by :func:`answer_with_fault`; the
mid-stream ones (``close-mid-stream``, ``stall-mid-stream``) by the server's
stream, ``unhealthy``, ``model-flood`` and ``models-deep`` by its /health and
model listing, ``metrics-flood`` by its /metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from lmproxy.sim.shapes import json_answer


class Answering(Protocol):
    """The connection a fault is played on (``server.MockConnection``)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


FAULTS = (
    "none",
    "400",
    "500",
    "502",
    "503",
    "504",
    "429",
    "hang",
    "close",
    "close-mid-stream",
    "stall-mid-stream",
    "garbage",
    "truncated",
    "wrong-length",
    "bad-chunk",
    "endless-chunk",
    "cut-mid-chunk",
    "chunked-extra",
    "early-hints",
    "close-delimited",
    "two-responses",
    "204-then-response",
    "chunked-then-response",
    "connection-named",
    "unhealthy",
    "model-flood",
    "models-deep",
    "metrics-flood",
)
ANSWERED = frozenset({"400", "500", "502", "503", "504", "429"})  # that status, a JSON body
SECOND_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Second: yes\r\n\r\nSECOND"
FLOOD_MODELS = 5000


async def answer_with_fault(conn: Answering, fault: str) -> bool:
    """Answer as ``fault`` says, if it is one that answers before any token; whether it was."""
    if fault in ANSWERED:
        status = int(fault)
        extra = b"Retry-After: 1\r\n" if status == 429 else b""
        conn.write(json_answer(status, {"error": f"simulated {status}"}, extra))
        return True
    written = _WRITTEN.get(fault)
    if written is not None:
        data, then_close = written
        conn.write(data)
        if then_close:
            conn.close()
        return True
    played = _PLAYED.get(fault)
    if played is None:
        return False
    await played(conn)
    return True


_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
_SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
_EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "tok "}}]}\n\n'
_CHUNKED = b'{"id": "chunked", "object": "chat.completion"}'
_HINTED = b'{"id": "hinted", "object": "chat.completion"}'

# The faults that are bytes written at once: those bytes, and whether the connection
# is closed after them.
_WRITTEN: dict[str, tuple[bytes, bool]] = {
    "garbage": (b"HTTP/1.1 2OO NOT\x00HTTP\r\n\x01\x02garbage\r\n\r\n", True),
    # promises 1000 bytes, sends 10, closes
    "truncated": (_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"id": "tr', True),
    # sends more body than its Content-Length says
    "wrong-length": (_HEAD + b"Content-Length: 5\r\n\r\n" + b'{"id": "too long"}', False),
    # a chunk size that is not hex
    "bad-chunk": (
        _HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nZZ\r\nxx\r\n',
        False,
    ),
    # a whole chunked answer followed by junk
    "chunked-extra": (
        _HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_CHUNKED), _CHUNKED)
        + b"JUNK AFTER THE ANSWER",
        False,
    ),
    "early-hints": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + _HEAD
        + b"Content-Length: %d\r\n\r\n%s" % (len(_HINTED), _HINTED),
        False,
    ),
    "two-responses": (_HEAD + b"Content-Length: 5\r\n\r\nhello" + SECOND_RESPONSE, False),
    "204-then-response": (b"HTTP/1.1 204 No Content\r\n\r\n" + SECOND_RESPONSE, False),
    "chunked-then-response": (
        _HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SECOND_RESPONSE,
        False,
    ),
    "connection-named": (
        _HEAD + b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Kept: yes\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        False,
    ),
}


async def _hang(conn: Answering) -> None:
    await asyncio.Event().wait()  # until the connection is lost


async def _close(conn: Answering) -> None:
    conn.close()


async def _endless_chunk(conn: Answering) -> None:
    """Announces a chunk, sends part of it, stalls."""
    conn.write(_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b'{"id": "en')
    await asyncio.Event().wait()


async def _cut_mid_chunk(conn: Answering) -> None:
    """Two whole chunks, then half of a third, then the close."""
    whole = b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)
    conn.write(_SSE + b"Transfer-Encoding: chunked\r\n\r\n" + whole * 2)
    await asyncio.sleep(0.05)
    conn.write(b"%x\r\n%s" % (len(_EVENT), _EVENT[:10]))
    conn.close()


async def _close_delimited(conn: Answering) -> None:
    """Events over time; the close ends the body."""
    conn.write(_SSE + b"Connection: close\r\n\r\n" + _EVENT)
    for _ in range(3):
        await asyncio.sleep(0.01)
        conn.write(_EVENT)
    conn.write(b"data: [DONE]\n\n")
    conn.close()


# The faults played over time (or that never end).
_PLAYED: dict[str, Callable[[Answering], Awaitable[None]]] = {
    "hang": _hang,
    "close": _close,
    "endless-chunk": _endless_chunk,
    "cut-mid-chunk": _cut_mid_chunk,
    "close-delimited": _close_delimited,
}
