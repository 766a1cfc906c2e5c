"""Load: thousands of concurrent streams, every one accounted for; the connection limit."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from conftest import Mock, Router, chat_body, router_over, wait_until

from lmproxy.system import raise_open_file_limit

STREAMS = 2000
TOKENS = 20
FAULTY_EVERY = 10  # one stream in ten breaks off mid-stream at the backend
LOAD_DEADLINE_S = 60


async def _one_stream(port: int, index: int) -> str:
    """'ok', 'error-event' or 'failed:<why>', as the client saw it."""
    body = json.dumps(chat_body(stream=True, max_tokens=TOKENS)).encode()
    fault = b"X-Mock-Fault: close-mid-stream\r\n" if index % FAULTY_EVERY == 0 else b""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"failed:connect {exc}"
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + fault
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return f"failed:{head[:30]!r}"
        payload = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            payload += chunk[:-2]
        events = [e for e in payload.split(b"\n\n") if e]
        if events[-1] == b"data: [DONE]" and len(events) == TOKENS + 3:
            return "ok"
        if b'"error"' in events[-1]:
            return "error-event"
        return f"failed:incomplete {len(events)}"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"failed:{type(exc).__name__}"
    finally:
        writer.close()


async def test_thousands_of_concurrent_streams_all_accounted_for(spawn):
    raise_open_file_limit()
    backends = [spawn(Mock, f"load-{i}", ["Qwen3-32B"], "--token-delay", "0.01") for i in range(2)]
    router = spawn(
        Router,
        *[a for b in backends for a in ("--backend", b.backend_arg())],
        # Every stream comes from 127.0.0.1: one address, past its default share.
        "--max-connections-per-ip",
        str(STREAMS),
    )
    router.wait_healthy(2)
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(_one_stream(router.port, i) for i in range(STREAMS))), LOAD_DEADLINE_S
    )
    elapsed = time.monotonic() - started
    failed = [r for r in results if r.startswith("failed")]
    assert not failed, (len(failed), failed[:5])
    errors = results.count("error-event")
    assert errors == STREAMS // FAULTY_EVERY
    assert results.count("ok") == STREAMS - errors
    # /stats adds up to what the clients saw.
    stats = router.get("/stats").json()["services"]
    assert sum(s["request_count"] for s in stats) == STREAMS
    assert sum(s["error_count"] for s in stats) == errors
    assert all(s["in_flight"] == 0 for s in stats)
    print(f"{STREAMS} streams in {elapsed:.1f}s")


def test_connections_past_the_limit_are_refused_fast(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--max-connections", "5")
    held = [socket.create_connection(("127.0.0.1", router.port), timeout=5) for _ in range(5)]
    try:
        # Refused at once, not queued: the held connections never free a place.
        wait_until(lambda: _refused_with_503(router.port), 5, "a refusal")
        assert _refused_with_503(router.port)
    finally:
        for sock in held:
            sock.close()
    # Room again once the held connections are gone.
    wait_until(lambda: router.get("/health").status == 200, 5, "service again")


def _refused_with_503(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.startswith(b"HTTP/1.1 503") and b"--max-connections" in data
