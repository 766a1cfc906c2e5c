"""Fault modes: what a broken or hostile backend does, on demand.

``FAULTS`` names them (the package docstring says what each does). The ones
that answer before any token are played by :func:`answer_with_fault`; the
mid-stream ones (``close-mid-stream``, ``stall-mid-stream``) by the server's
stream, ``unhealthy``, ``model-flood`` and ``models-deep`` by its /health and
model listing, ``metrics-flood`` by its /metrics.
"""

from __future__ import annotations

import asyncio
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
    if fault == "hang":
        await asyncio.Event().wait()  # until the connection is lost
        return True
    if fault == "close":
        conn.close()
        return True
    if fault == "garbage":
        conn.write(b"HTTP/1.1 2OO NOT\x00HTTP\r\n\x01\x02garbage\r\n\r\n")
        conn.close()
        return True
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if fault == "truncated":  # promises 1000 bytes, sends 10, closes
        conn.write(head + b"Content-Length: 1000\r\n\r\n" + b'{"id": "tr')
        conn.close()
        return True
    if fault == "wrong-length":  # sends more body than its Content-Length says
        conn.write(head + b"Content-Length: 5\r\n\r\n" + b'{"id": "too long"}')
        return True
    if fault == "bad-chunk":  # a chunk size that is not hex
        conn.write(head + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nZZ\r\nxx\r\n')
        return True
    if fault == "endless-chunk":  # announces a chunk, sends part of it, stalls
        conn.write(head + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b'{"id": "en')
        await asyncio.Event().wait()
        return True
    sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "tok "}}]}\n\n'
    if fault == "cut-mid-chunk":  # two whole chunks, then half of a third, then close
        whole = b"%x\r\n%s\r\n" % (len(event), event)
        conn.write(sse + b"Transfer-Encoding: chunked\r\n\r\n" + whole * 2)
        await asyncio.sleep(0.05)
        conn.write(b"%x\r\n%s" % (len(event), event[:10]))
        conn.close()
        return True
    if fault == "chunked-extra":  # a whole chunked answer followed by junk
        body = b'{"id": "chunked", "object": "chat.completion"}'
        conn.write(
            head
            + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            + b"JUNK AFTER THE ANSWER"
        )
        return True
    if fault == "early-hints":
        body = b'{"id": "hinted", "object": "chat.completion"}'
        conn.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            + head
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        return True
    if fault == "two-responses":
        conn.write(head + b"Content-Length: 5\r\n\r\nhello" + SECOND_RESPONSE)
        return True
    if fault == "204-then-response":
        conn.write(b"HTTP/1.1 204 No Content\r\n\r\n" + SECOND_RESPONSE)
        return True
    if fault == "chunked-then-response":
        conn.write(
            head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SECOND_RESPONSE
        )
        return True
    if fault == "connection-named":
        conn.write(
            head + b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Kept: yes\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        return True
    if fault == "close-delimited":  # events over time; the close ends the body
        conn.write(sse + b"Connection: close\r\n\r\n" + event)
        for _ in range(3):
            await asyncio.sleep(0.01)
            conn.write(event)
        conn.write(b"data: [DONE]\n\n")
        conn.close()
        return True
    return False
