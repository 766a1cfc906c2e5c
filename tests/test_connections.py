"""Client connections: limits, timeouts, flow control, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from pathlib import Path

from conftest import Mock, Router, chat_body, request, router_over, wait_until
from inproc import Harness, MemoryTransport

from lmproxy.backend.upstream import RECEIVE_BUFFER, Pool


async def _past_the_deadline(h: Harness, transport: MemoryTransport, delay_s: float) -> bytes:
    """Let ``delay_s`` pass (the deadline is the scenario), sweep as the router's timer
    would, and return what the router then wrote to the in-process client."""
    await asyncio.sleep(delay_s)
    h.sweep()
    await h.turn()
    return transport.take()


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# The 431 for a header block over 64 KiB: test_inproc.py, byte by byte.


async def test_slow_headers_are_cut_off_with_408():
    h = Harness(header_timeout=0.3)
    client, downstream = h.client()
    client.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
    h.sweep()
    assert downstream.take() == b"" and not downstream.closing  # not before the deadline
    data = await _past_the_deadline(h, downstream, 0.35)
    assert data.startswith(b"HTTP/1.1 408") and b"--header-timeout" in data
    assert downstream.closing or downstream.eof_written


async def test_idle_keep_alive_connection_is_closed():
    h = Harness(keepalive_timeout=0.3)
    client, downstream = h.client()
    client.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert downstream.take().startswith(b"HTTP/1.1 200 ")
    h.sweep()
    assert not downstream.closing  # not before the deadline
    assert await _past_the_deadline(h, downstream, 0.35) == b""  # closed, silently
    assert downstream.closing


def test_backend_connections_are_reused(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend])
    router.post("/v1/chat/completions", chat_body())
    before = backend.stats()["total_connections"]
    for _ in range(5):
        assert router.post("/v1/chat/completions", chat_body()).status == 200
    # One connection for each stats query; the five requests shared a pooled one.
    assert backend.stats()["total_connections"] == before + 1


def _dechunk(data: bytes) -> bytes:
    """The body of a chunked message: the router re-frames, so events may span chunks."""
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_client_pauses_the_backend_and_memory_stays_bounded(spawn):
    # 60,000 events of ~200 bytes: ~12 MB that a router without flow control would buffer.
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend])
    rss_before = _rss_kib(router.proc.pid)
    body = json.dumps(chat_body(stream=True, max_tokens=60_000)).encode()
    sock = socket.socket()
    # A fixed receive buffer: this kernel lets an unread socket's buffer grow to 32 MB,
    # which could hold the whole stream and let the backend finish with no
    # back-pressure from the router at all.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", router.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    received = bytearray(sock.recv(1024))  # the head arrives, then the client stops reading
    wait_until(lambda: backend.stats()["write_pauses"] >= 1, 10, "the router's back-pressure")
    time.sleep(0.5)  # held: a router without flow control reads the 12 MB in this time
    stats = backend.stats()
    assert stats["streams_started"] == 1 and stats["streams_completed"] == 0
    assert _rss_kib(router.proc.pid) - rss_before < 8 * 1024
    # Once the client reads, everything arrives, complete.
    sock.settimeout(30)
    while not received.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1 << 20)
        assert chunk, "connection closed early"
        received += chunk
    sock.close()
    body = _dechunk(bytes(received).partition(b"\r\n\r\n")[2])
    assert body.count(b"data: ") == 60_000 + 3  # role + tokens + finish + [DONE]
    wait_until(lambda: backend.stats()["streams_completed"] == 1, 5, "the backend to finish")


def test_sigterm_lets_streams_in_flight_finish(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"], "--token-delay", "0.05")
    router = router_over(spawn, [backend], "--shutdown-timeout", "10")
    result: dict[str, bytes] = {}

    def stream() -> None:
        body = json.dumps(chat_body(stream=True, max_tokens=20)).encode()
        with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                b"\r\n\r\n%s" % (len(body), body)
            )
            result["data"] = _recv_all(sock)

    client = threading.Thread(target=stream)
    client.start()
    wait_until(lambda: backend.stats()["streams_started"] == 1, 5, "the stream to start")
    router.signal(signal.SIGTERM)
    # New connections are refused while the stream finishes.
    wait_until(lambda: _refused(router.port), 5, "the listener to close")
    client.join(10)
    head, _, body = result["data"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert _dechunk(body).endswith(b"data: [DONE]\n\n")
    assert router.proc.wait(10) == 0
    assert "stopped" in router.output


def test_sigint_exits_zero_when_idle(spawn):
    router = spawn(Router)
    assert request(router.port, "GET", "/readiness").status == 503  # no services
    router.signal(signal.SIGINT)
    assert router.proc.wait(10) == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_a_backend_connections_receive_buffer_is_fixed():
    """Left to autotuning, the kernel would hold up to tcp_rmem's maximum (32 MiB here)
    of a backend's answer for a client that stopped reading, before the backend felt any
    back-pressure; the pool fixes it (the kernel reports twice what was set)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool("127.0.0.1", port, max_idle=1, idle_timeout_s=5, connect_timeout_s=5)
    conn = await pool.connect()
    try:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * RECEIVE_BUFFER
    finally:
        conn.close()
        server.close()
