"""Backend faults with real processes: killed, hung, broken, erroring. Nothing is lost."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
from conftest import Mock, chat_body, free_port, router_over, wait_until

_FAULTY_CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s"


def _chat_with(headers: bytes) -> bytes:
    """A raw chat request carrying ``headers`` (each line ending in CRLF)."""
    body = json.dumps(chat_body()).encode()
    return _FAULTY_CHAT % (headers, len(body), body)


def _answer_until_close(port: int, data: bytes) -> bytes:
    """Send raw bytes to the router; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_backend_killed_while_answering_is_retried_elsewhere(spawn):
    slow = spawn(Mock, "slow", ["Qwen3-32B"], "--ttft", "3")
    fast = spawn(Mock, "fast", ["Qwen3-32B"])
    router = router_over(
        spawn, [slow, fast], "--health-interval", "60", "--strategy", "round-robin"
    )
    # Round-robin sends the first request to slow; kill it while it "thinks".
    result = {}
    client = threading.Thread(
        target=lambda: result.update(resp=router.post("/v1/chat/completions", chat_body()))
    )
    client.start()
    wait_until(lambda: "/v1/chat/completions" in slow.stats()["paths"], 5, "slow to get it")
    slow.signal(signal.SIGKILL)
    client.join(10)
    resp = result["resp"]
    assert resp.status == 200, resp  # the client never saw the failure
    assert resp.headers["x-mock-server"] == "fast"
    assert router.stats_of("slow")["error_count"] == 1


def test_killed_backend_is_ejected_and_readmitted_when_back(spawn):
    port = free_port()
    doomed = spawn(Mock, "doomed", ["Qwen3-32B"], port=port)
    spare = spawn(Mock, "spare", ["Qwen3-32B"])
    router = router_over(spawn, [doomed, spare], "--max-errors", "2", "--health-interval", "0.5")
    doomed.kill()
    for _ in range(6):  # every request still succeeds, on spare
        resp = router.post("/v1/chat/completions", chat_body())
        assert resp.status == 200 and resp.headers["x-mock-server"] == "spare"
    wait_until(lambda: not router.stats_of("doomed")["healthy"], 5, "the ejection")
    spawn(Mock, "doomed", ["Qwen3-32B"], port=port)  # back, on the same port
    wait_until(lambda: router.stats_of("doomed")["healthy"], 5, "re-admission")
    servers = {
        router.post("/v1/chat/completions", chat_body()).headers["x-mock-server"] for _ in range(4)
    }
    assert servers == {"doomed", "spare"}


@pytest.mark.parametrize("fault", ["truncated", "bad-chunk"])
def test_broken_body_cuts_the_response_and_the_connection_is_discarded(spawn, fault):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--max-errors", "0")
    # The router closes: the body is known incomplete.
    data = _answer_until_close(router.port, _chat_with(b"X-Mock-Fault: %s\r\n" % fault.encode()))
    assert data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n")
    before = backend.stats()["total_connections"]
    assert router.post("/v1/chat/completions", chat_body()).status == 200
    # A new backend connection (+1 for the stats query): the broken one was not reused.
    assert backend.stats()["total_connections"] == before + 2
    assert router.stats_of("b")["error_count"] == 1


def test_longer_body_than_content_length_is_not_reused(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--max-errors", "0")
    resp = router.post(
        "/v1/chat/completions", chat_body(), headers={"X-Mock-Fault": "wrong-length"}
    )
    assert resp.status == 200 and resp.body == b'{"id"'  # what the backend declared
    before = backend.stats()["total_connections"]
    assert router.post("/v1/chat/completions", chat_body()).status == 200
    assert backend.stats()["total_connections"] == before + 2


def test_chunk_that_never_ends_times_out(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--request-timeout", "0.5")
    started = time.monotonic()
    data = _answer_until_close(router.port, _chat_with(b"X-Mock-Fault: endless-chunk\r\n"))
    assert data.startswith(b"HTTP/1.1 200") and not data.endswith(b"0\r\n\r\n")
    assert time.monotonic() - started > 0.4  # not before the deadline (a floor load cannot break)
    wait_until(lambda: backend.stats()["client_disconnects"] == 1, 5, "the backend dropped")


def test_client_hang_up_reaches_the_backend_mid_stream(spawn):
    """The hang-up is passed on while the backend streams, not when it ends: 5,000
    tokens take 50 s, and the backend counts a disconnect only while it responds.
    (How soon it arrives depends on the machine, not on the router's logic.)"""
    backend = spawn(Mock, "b", ["Qwen3-32B"], "--token-delay", "0.01")
    router = router_over(spawn, [backend])
    body = json.dumps(chat_body(stream=True, max_tokens=5000)).encode()
    sock = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    sock.recv(65536)
    time.sleep(0.2)  # mid-stream
    sock.close()
    wait_until(lambda: backend.stats()["client_disconnects"] == 1, 10, "the backend to see it")
    assert backend.stats()["streams_completed"] == 0


def test_connect_timeout_gives_502_without_waiting_for_the_request_timeout(spawn):
    port = free_port()
    backend = spawn(Mock, "blackhole", ["Qwen3-32B"], port=port)
    router = router_over(
        spawn,
        [backend],
        "--health-interval",
        "60",
        "--connect-timeout",
        "0.5",
        "--request-timeout",
        "30",
    )
    backend.kill()
    # A listener that never accepts, its one-place backlog filled: SYNs go unanswered.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        started = time.monotonic()
        resp = router.post("/v1/chat/completions", chat_body())
        elapsed = time.monotonic() - started
    finally:
        filler.close()
        listener.close()
    assert resp.status == 502, resp
    # The connect timeout ended it, not --request-timeout's 30 s (past the client's 10 s).
    assert "timed out after 0.5s" in resp.json()["error"]
    assert elapsed > 0.4  # not before the deadline (a floor load cannot break)


def test_bytes_after_a_chunked_answer_are_dropped_and_the_connection_not_reused(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--max-errors", "0")
    before = backend.stats()["total_connections"]
    # Two requests on one client connection: the junk must not reach the client,
    # where it would sit in front of the second answer.
    data = _answer_until_close(
        router.port,
        _chat_with(b"X-Mock-Fault: chunked-extra\r\n") + _chat_with(b"Connection: close\r\n"),
    )
    first, _, second = data.partition(b"0\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b'{"id": "chunked"' in first
    assert second.startswith(b"HTTP/1.1 200") and b"JUNK" not in data
    # The second answer came over a new backend connection (+1 for the stats query).
    assert backend.stats()["total_connections"] == before + 3


def test_interim_1xx_answer_is_not_relayed(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend])
    data = _answer_until_close(
        router.port, _chat_with(b"X-Mock-Fault: early-hints\r\nConnection: close\r\n")
    )
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Link:" not in head
    assert json.loads(answer) == {"id": "hinted", "object": "chat.completion"}
