"""The router's own Python cost per request, with no sockets and no other process.

    python -m bench.hotpath --requests 50000 --strategy cache-aware

One Router, one pooled backend connection and one client connection, all with
in-memory transports (the tests' in-process layer, ``tests/inproc.py``): each
request's bytes are fed to the client connection, a canned backend response to
the backend connection, and the event loop turns once. What is timed (process
CPU time) is everything lmproxy does in Python for a small non-streamed chat
completion (parsing, routing, forwarding, relaying, accounting) plus one loop
turn, and none of the syscalls.

Use it to tune the hot path: on a shared machine the socket benchmarks
(``python -m bench``) move 10-20% between runs; this, on a quiet core, a few
percent. Other work on the core inflates single runs, so the best of several is
reported. Run it pinned to a core (``taskset -c 0``) and compare figures from
the same session.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import msgspec

from bench.peers import BENCH_KEY, BENCH_KEYS_TOML
from lmproxy.config import KeySpec
from strategies import SharesState
from tests.inproc import Harness  # the tests' in-process layer (run from the repo root)

# --keys: the benchmark's own [[keys]] entry, limited in rpm, tpm and max_in_flight.
BENCH_KEY_SPEC = msgspec.convert(msgspec.toml.decode(BENCH_KEYS_TOML)["keys"][0], KeySpec)


def chat_request(system_bytes: int = 0, key: bool = False) -> bytes:
    """A small chat completion; with ``system_bytes``, after a system prompt that long
    (what cache-aware hashes and, with --share, hands to the other workers)."""
    system = (
        b'{"role":"system","content":"%s"},'
        % (b"You are helpful. " * (system_bytes // 17 + 1))[:system_bytes]
        if system_bytes
        else b""
    )
    body = (
        b'{"model":"Qwen3-32B","messages":[%s{"role":"user","content":"Hello"}],"max_tokens":16}'
        % system
    )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (b"Authorization: Bearer %s\r\n" % BENCH_KEY.encode() if key else b"", len(body), body)
    )


ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"Qwen3-32B",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox"},'
    b'"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":16,'
    b'"total_tokens":21}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"date: Wed, 25 Nov 2026 10:00:00 GMT\r\nserver: uvicorn\r\n\r\n%s" % (len(ANSWER), ANSWER)
)


async def measure(
    requests: int, strategy: str, system_bytes: int = 0, share: bool = False, keys: bool = False
) -> float:
    """Microseconds of CPU per request."""
    harness = Harness(strategy=strategy, keys=[BENCH_KEY_SPEC] if keys else [])
    service = harness.service
    backend, backend_transport = harness.backend()
    client, client_transport = harness.client()
    request = chat_request(system_bytes, keys)
    sharer = None
    if share:  # as a worker of --workers N does: keep what is learnt, hand it over in batches
        sharer = harness.router.strategy
        if not isinstance(sharer, SharesState):
            raise SystemExit(f"strategy {strategy} shares no state")
        sharer.sharing = True

    async def run(count: int) -> float:
        gc.collect()
        before = service.request_count
        started = time.process_time()
        for i in range(count):
            if sharer is not None and i % 100 == 0:
                sharer.share()
            client.data_received(request)
            backend.data_received(RESPONSE)
            await asyncio.sleep(0)  # the journey's finish runs from the loop
            client_transport.written.clear()
            backend_transport.written.clear()
        elapsed = time.process_time() - started
        if service.request_count - before != count or client_transport.closing:
            raise SystemExit(f"only {service.request_count - before} of {count} requests completed")
        return elapsed

    await run(max(1, requests // 5))  # warm-up
    return await run(requests) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--strategy", default="cache-aware")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    parser.add_argument(
        "--system-bytes", type=int, default=0, help="a system prompt this long in each request"
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="share what the strategy learns, as each worker of --workers N does",
    )
    parser.add_argument(
        "--keys",
        action="store_true",
        help="requests made with a [[keys]] key that has rpm, tpm and max_in_flight limits",
    )
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    figures = [
        runner(measure(args.requests, args.strategy, args.system_bytes, args.share, args.keys))
        for _ in range(args.repeat)
    ]
    label = f"{args.strategy} with keys" if args.keys else args.strategy
    print(
        f"{label}: {min(figures):.2f} us of CPU per request in lmproxy's Python path "
        f"(best of {args.repeat}: {', '.join(f'{f:.2f}' for f in figures)})"
    )


if __name__ == "__main__":
    main()
