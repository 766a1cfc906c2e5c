"""What a client's request head and body cost the router, in objects as well as bytes,
and when it sends ``100 Continue``.

The byte bounds alone let a 63 KB head of 9,000 tiny headers cost a MiB and a half (each
header is a tuple of two objects), and a body sent a few bytes per read cost 25 times
its size (one ``bytes`` per read). The in-process cases (``inproc.py``) check each
request by its bytes; one case runs a real router and reads its RSS.
"""

from __future__ import annotations

import json
import re
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mock, Router, wait_until
from inproc import BODY, Harness, chat_request
from test_inproc import EVENT, WHOLE, ok_response, statuses

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_HEADERS = 100  # lmproxy.client.connection.MAX_HEADERS, as a client sees it


def head_with(count: int, request_line: bytes = b"GET /health HTTP/1.1") -> bytes:
    """A complete head of ``count`` headers, Host included."""
    extra = b"".join(b"X-H%d: v\r\n" % n for n in range(count - 1))
    return request_line + b"\r\nHost: x\r\n" + extra + b"\r\n"


# --- the number of headers ----------------------------------------------------------


async def test_a_hundred_headers_are_served():
    h = Harness()
    client, downstream = h.client()
    client.data_received(head_with(MAX_HEADERS))
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and not downstream.closing


async def test_a_hundred_and_one_headers_get_431_with_what_to_change():
    h = Harness()
    client, downstream = h.client()
    client.data_received(head_with(MAX_HEADERS + 1))
    answer = downstream.take()
    assert statuses(answer) == [431]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert error == {"error": "more than 100 request headers (trailers included); send fewer"}
    assert downstream.eof_written  # the lingering close


async def test_trailers_count_against_the_header_limit():
    h = Harness()
    client, downstream = h.client()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    trailers = b"".join(b"X-T%d: v\r\n" % n for n in range(MAX_HEADERS))
    client.data_received(head + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(BODY), BODY, trailers))
    assert statuses(downstream.take()) == [431]


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    backend = Mock("bounded", ["Qwen3-32B"], "--token-delay", "0.01")
    # A fixed mmap threshold: glibc's own moves up to a freed block's size (4 MiB bodies),
    # and then serves such blocks from a heap it may not give back, so RSS would say
    # "held" of memory that is free, on some runs. Fixed, a freed body leaves RSS at once
    # and one still held stays in it: what these tests measure.
    proc = Router("--backend", backend.backend_arg(), env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    try:
        proc.wait_healthy(1)
        yield proc
    finally:
        proc.stop()
        backend.stop()


def rss_kib(proc: Router) -> int:
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def tcp_queues(port: int) -> tuple[int, int, int]:
    """Of the loopback connections to ``port``: how many the router still has open, the
    bytes it has not read yet, and the bytes clients sent that it has not acknowledged."""
    open_, unread, unsent = 0, 0, 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = int(fields[1].split(":")[1], 16), fields[2], fields[3]
        tx, rx = (int(q, 16) for q in fields[4].split(":"))
        if local == port and state != "0A":  # the router's side, not its listener
            open_ += 1
            unread += rx
        elif int(remote.split(":")[1], 16) == port:
            unsent += tx
    return open_, unread, unsent


def test_heads_of_tiny_headers_cost_little_memory_and_it_comes_back(router):
    """200 connections each send a 63 KB head of 9,000 tiny headers, never ending it,
    three rounds over: the router holds far less than the MiB and a half a head of
    9,000 header objects costs, and what it held comes back when they close."""
    connections = 200
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"ab:cd\r\n" * 9000
    assert len(head) < 64 * 1024  # under the byte bound: only the count refuses it

    def read_all() -> bool:
        _, unread, unsent = tcp_queues(router.port)
        return unread == 0 and unsent == 0

    before = rss_kib(router)
    held = []
    for _ in range(3):
        socks = [socket.create_connection(("127.0.0.1", router.port)) for _ in range(connections)]
        try:
            for sock in socks:
                sock.sendall(head)
            # Everything sent has been read (and so parsed) by the router.
            wait_until(read_all, 30, "the router to read every head")
            held.append(rss_kib(router))
        finally:
            for sock in socks:
                sock.close()
        wait_until(lambda: tcp_queues(router.port)[0] == 0, 10, "the connections to close")
    per_connection = (held[0] - before) / connections
    assert per_connection < 100, f"{per_connection:.0f} KiB per connection; RSS {before} {held}"
    # The next rounds reuse what the first one took: no growth from round to round.
    assert held[2] <= held[0] + 4 * 1024, f"RSS {before} KiB, then {held} KiB"
    assert router.get("/health").status == 200


def test_the_bodies_of_clients_that_hang_up_are_freed_at_once(router):
    """Ten clients a round each send a 4 MiB body for a stream, read the head and hang
    up, five rounds over: the bodies are let go as the connections close. (They were
    held until the garbage collector came round to the closed connections' reference
    cycles, which it does by object counts: 40 MiB a round stayed, rounds on end.)"""
    body = json.dumps(
        {
            "model": "Qwen3-32B",
            "stream": True,
            "max_tokens": 4000,
            "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}],
        }
    ).encode()
    sent = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    before = rss_kib(router)
    after = []
    for _ in range(5):
        socks = [socket.create_connection(("127.0.0.1", router.port)) for _ in range(10)]
        try:
            for sock in socks:
                sock.sendall(sent)
            for sock in socks:
                sock.settimeout(20)
                assert sock.recv(12) == b"HTTP/1.1 200"  # streaming: the body was taken
        finally:
            for sock in socks:
                sock.close()
        wait_until(lambda: tcp_queues(router.port)[0] == 0, 10, "the connections to close")
        router.wait_idle()
        after.append(rss_kib(router))
    assert max(after) < before + 16 * 1024, f"RSS {before} KiB, then {after} KiB"


# --- the body, in one buffer ----------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_sent_two_bytes_a_read_costs_about_its_size(chunked):
    h = Harness()
    backend, upstream = h.backend()
    client, downstream = h.client()
    body = BODY[:-1] + b',"user":"%s"}' % (b"u" * (64 * 1024))
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    client.data_received(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"%s\r\n\r\n" % framing
    )
    pieces = [body[i : i + 2] for i in range(0, len(body), 2)]
    tracemalloc.start()
    try:
        for piece in pieces[:-1]:
            client.data_received(b"2\r\n%s\r\n" % piece if chunked else piece)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One growing buffer, not one object per read (which cost 25 times the body).
    assert held < 2 * len(body), f"{held} bytes held for a body of {len(body)}"
    last = pieces[-1]
    client.data_received(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last) if chunked else last)
    assert upstream.take().endswith(b"\r\n\r\n" + body)  # forwarded as sent, byte for byte
    backend.data_received(ok_response())
    await h.turn()
    assert statuses(downstream.take()) == [200]


# --- 100 Continue ----------------------------------------------------------------------


def expecting(body: bytes = BODY, version: bytes = b"1.1", method: bytes = b"POST") -> bytes:
    """A head with ``Expect: 100-continue``; the body is the client's to send after."""
    return (
        b"%s /v1/chat/completions HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (method, version, len(body))
    )


async def test_100_continue_goes_to_an_http11_request_with_a_body():
    h = Harness()
    backend, upstream = h.backend()
    client, downstream = h.client()
    client.data_received(expecting())
    assert downstream.take() == CONTINUE
    client.data_received(BODY)
    assert upstream.take().endswith(BODY)
    backend.data_received(ok_response())
    await h.turn()
    assert statuses(downstream.take()) == [200]


async def test_no_100_continue_to_http10():
    h = Harness()
    backend, upstream = h.backend()
    client, downstream = h.client()
    client.data_received(expecting(version=b"1.0"))
    assert downstream.take() == b""  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client
    client.data_received(BODY)
    assert upstream.take().endswith(BODY)
    backend.data_received(ok_response())
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and b"100 Continue" not in answer


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_no_100_continue_when_no_body_is_expected(method):
    h = Harness()
    client, downstream = h.client()
    client.data_received(
        b"%s /health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n%s\r\n"
        % (method, b"Content-Length: 0\r\n" if method == b"POST" else b"")
    )
    await h.turn()
    answer = downstream.take()
    # One final answer (a POST to /health gets its 405), and no interim one.
    assert b"100 Continue" not in answer and statuses(answer) == [200 if method == b"GET" else 405]


async def test_100_continue_behind_a_stream_comes_after_the_stream():
    """Pipelined: a stream is under way when the next request's head, with Expect,
    arrives; its 100 must not land inside the stream's chunked body, but after it."""
    h = Harness()
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(BODY.replace(b"}", b',"stream":true}')))
    backend.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + WHOLE
    )
    client.data_received(expecting())
    backend.data_received(WHOLE + b"0\r\n\r\n")
    await h.turn()
    answer = downstream.take()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert statuses(head) == [200]
    # The stream's body is the backend's, byte for byte, and the 100 comes after it.
    assert rest == WHOLE * 2 + b"0\r\n\r\n" + CONTINUE, rest
    client.data_received(BODY)
    backend.data_received(ok_response())
    await h.turn()
    assert statuses(downstream.take()) == [200]
    assert EVENT in answer
