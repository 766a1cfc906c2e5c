"""Server-Sent Events through the router: as produced, unchanged, and failures mid-stream."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import pytest
from conftest import Mock, chat_body, router_over, wait_until


async def _open_stream(port: int, body: dict, headers: str = "") -> tuple:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + headers.encode()
        + b"Content-Length: %d\r\n\r\n" % len(payload)
        + payload
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One HTTP chunk of a chunked body (b"" for the last one)."""
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def _events(reader: asyncio.StreamReader, timeout_s: float = 10) -> list[tuple[float, bytes]]:
    """(arrival time, event) for every SSE event until the body ends."""
    events, buf = [], b""
    while True:
        chunk = await asyncio.wait_for(_read_chunk(reader), timeout_s)
        if not chunk:
            return events
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            events.append((time.monotonic(), event))


@pytest.fixture(scope="module")
def one(module_spawn):
    """A backend "b" behind a router with default flags, shared by the module's cases
    that count only their own errors (a stream cut counts one; a success between
    two resets --max-errors' consecutive count)."""
    backend = module_spawn(Mock, "b", ["Qwen3-32B"])
    return router_over(module_spawn, [backend]), backend


@pytest.fixture
def paced(spawn):
    # 10 tokens, 0.15 s apart: the whole answer takes 1.5 s at the backend.
    backend = spawn(Mock, "paced", ["Qwen3-32B"], "--token-delay", "0.15")
    router = router_over(spawn, [backend])
    return router, backend


async def test_events_arrive_as_the_backend_produces_them(paced):
    """Each event is relayed as the backend sends it, not held for the stream's end:
    a backend that sends 5 of its 10 tokens and then goes silent, its stream never
    ending, still has those 5 reach the client, one by one. (By order, not by clock:
    a loaded machine stretches every gap.)"""
    router, backend = paced
    reader, writer, head = await _open_stream(
        router.port, chat_body(stream=True, max_tokens=10), "X-Mock-Fault: stall-mid-stream\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in head
    events, buf = [], b""
    while len(events) < 6:  # the role, then 5 tokens
        buf += await asyncio.wait_for(_read_chunk(reader), 10)
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            events.append(json.loads(event[6:]))
    writer.close()
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events).split() == [
        "The",
        "quick",
        "brown",
        "fox",
        "jumps",
    ]
    assert backend.stats()["streams_completed"] == 0  # the backend never finished


async def test_stream_bytes_are_forwarded_unchanged(one):
    router, backend = one
    direct_reader, direct_writer, _ = await _open_stream(
        backend.port, chat_body(stream=True, max_tokens=5)
    )
    proxied_reader, proxied_writer, _ = await _open_stream(
        router.port, chat_body(stream=True, max_tokens=5)
    )
    direct = [e for _, e in await _events(direct_reader)]
    proxied = [e for _, e in await _events(proxied_reader)]
    direct_writer.close()
    proxied_writer.close()

    assert len(direct) == len(proxied) == 8
    assert [json.loads(e[6:])["choices"] for e in direct[:-1]] == [
        json.loads(e[6:])["choices"] for e in proxied[:-1]
    ]
    assert proxied[-1] == b"data: [DONE]"


async def test_backend_dying_mid_stream_ends_with_error_event(one):
    router, _ = one
    errors = router.stats_of("b")["error_count"]
    reader, writer, head = await _open_stream(
        router.port, chat_body(stream=True, max_tokens=10), "X-Mock-Fault: close-mid-stream\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    events = [e for _, e in await _events(reader)]
    error = json.loads(events[-1][6:])
    assert set(error) == {"error"} and "mid-stream" in error["error"]
    assert b"[DONE]" not in b"".join(events)
    # ...and then the router closes the connection cleanly.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert router.stats_of("b")["error_count"] == errors + 1


async def test_backend_process_killed_mid_stream(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"], "--token-delay", "0.05")
    router = router_over(spawn, [backend], "--health-interval", "60")
    reader, writer, _ = await _open_stream(router.port, chat_body(stream=True, max_tokens=200))
    first = await asyncio.wait_for(_read_chunk(reader), 10)
    assert first.startswith(b"data: ")
    backend.signal(signal.SIGKILL)
    events = [e for _, e in await _events(reader)]
    assert b'"error"' in events[-1] and "mid-stream" in json.loads(events[-1][6:])["error"]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    stats = router.stats_of("b")
    assert stats["error_count"] == 1 and stats["in_flight"] == 0


async def test_stalled_stream_ends_after_request_timeout(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--request-timeout", "0.5")
    started = time.monotonic()
    reader, writer, _ = await _open_stream(
        router.port, chat_body(stream=True, max_tokens=10), "X-Mock-Fault: stall-mid-stream\r\n"
    )
    events = [e for _, e in await _events(reader)]
    assert "sent nothing for 0.5s" in json.loads(events[-1][6:])["error"]
    assert time.monotonic() - started > 0.4  # not before the deadline (a floor load cannot break)
    writer.close()


async def test_long_healthy_stream_outlives_request_timeout(spawn):
    # 12 tokens 0.1 s apart = 1.2 s of stream, with a 0.5 s request timeout.
    backend = spawn(Mock, "b", ["Qwen3-32B"], "--token-delay", "0.1")
    router = router_over(spawn, [backend], "--request-timeout", "0.5")
    reader, writer, _ = await _open_stream(router.port, chat_body(stream=True, max_tokens=12))
    events = [e for _, e in await _events(reader)]
    assert events[-1] == b"data: [DONE]"
    writer.close()


def test_client_hang_up_closes_the_backend_connection(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"], "--token-delay", "0.05")
    router = router_over(spawn, [backend])
    body = json.dumps(chat_body(stream=True, max_tokens=1000)).encode()
    sock = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert backend.stats()["streams_started"] == 1
    sock.close()
    # 1,000 tokens take 50 s: the backend counts the hang-up only while it still streams.
    wait_until(lambda: backend.stats()["client_disconnects"] == 1, 10, "the backend to see it")
    stats = backend.stats()
    assert stats["streams_completed"] == 0
    # The connection was not returned to the pool: the next request opens a new one.
    connections = stats["total_connections"]
    assert router.post("/v1/chat/completions", chat_body(max_tokens=1)).status == 200
    # +1 for the new backend connection, +1 for this stats query's own.
    assert backend.stats()["total_connections"] == connections + 2
    # A hang-up is not the service's fault.
    assert router.stats_of("b")["error_count"] == 0
    assert router.get("/health").json()["healthy_services"] == "1/1"


def test_hang_up_while_waiting_for_the_head(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"], "--ttft", "5")
    router = router_over(spawn, [backend])
    body = json.dumps(chat_body(max_tokens=1)).encode()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"\r\n%s" % (len(body), body)
        )
        wait_until(lambda: backend.stats()["requests"] >= 3, 5, "the request to reach it")
    wait_until(lambda: backend.stats()["client_disconnects"] == 1, 5, "the backend to see it")
    assert router.stats_of("b")["in_flight"] == 0


async def test_chunks_pass_as_the_backend_framed_them(one):
    # No token delay: the simulator writes 64 events per chunk. The router relays
    # the backend's chunks as they are, not a chunk per event or per read.
    router, backend = one
    shapes = []
    for port in (backend.port, router.port):
        reader, writer, head = await _open_stream(port, chat_body(stream=True, max_tokens=100))
        assert b"chunked" in head.lower()
        chunks = []
        while chunk := await asyncio.wait_for(_read_chunk(reader), 10):
            chunks.append(chunk)
        writer.close()
        shapes.append([chunk.count(b"\n\n") for chunk in chunks])
    direct, proxied = shapes
    assert proxied == direct and direct[0] == 64


async def test_connection_closed_inside_a_chunk_gets_no_event_appended(one):
    # An event of ours after half a chunk would be read as the rest of that chunk:
    # the client gets the whole chunks, the half, and the close.
    router, _ = one
    errors = router.stats_of("b")["error_count"]
    reader, writer, head = await _open_stream(
        router.port, chat_body(stream=True), "X-Mock-Fault: cut-mid-chunk\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert (await _read_chunk(reader)).startswith(b"data: ")
    assert (await _read_chunk(reader)).startswith(b"data: ")
    rest = await asyncio.wait_for(reader.read(), 5)  # until the router closes
    writer.close()
    assert rest.split(b"\r\n", 1)[1] == b'data: {"ch'
    wait_until(lambda: router.stats_of("b")["error_count"] == errors + 1, 5, "the error counted")


async def test_close_delimited_stream_is_chunked_and_the_client_keeps_its_connection(one):
    router, _ = one
    reader, writer, head = await _open_stream(
        router.port, chat_body(stream=True), "X-Mock-Fault: close-delimited\r\n"
    )
    lines = head.lower().split(b"\r\n")
    assert b"transfer-encoding: chunked" in lines and b"connection: close" not in lines
    events = [e for _, e in await _events(reader)]
    assert len(events) == 5 and events[-1] == b"data: [DONE]"
    payload = json.dumps(chat_body(max_tokens=2)).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(payload), payload)
    )
    again = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert again.startswith(b"HTTP/1.1 200")
