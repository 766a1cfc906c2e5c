"""Load generators: wrk for request rates, an asyncio client for stream timing and counts."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import BENCH_KEY

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk_missing() -> str | None:
    return None if shutil.which("wrk") else "wrk is not installed (bench/setup.sh)"


@dataclass
class WrkResult:
    requests: int = 0
    rps: float = 0.0
    p50_s: float = float("nan")
    p99_s: float = float("nan")
    errors: int = 0


def _seconds(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def run_wrk(
    port: int,
    body: bytes,
    *,
    connections: int,
    duration_s: float,
    cpus: str,
    rate: float | None = None,
    path: str = "/v1/chat/completions",
    scheme: str = "http",
) -> WrkResult:
    """POST ``body`` with wrk; with ``rate``, each connection paces itself to reach it
    (about: wrk's timer counts milliseconds, and a request's own time adds to its wait)."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        lua = [
            'wrk.method = "POST"',
            'wrk.headers["Content-Type"] = "application/json"',
            # Every peer gets it; only lmproxy-keys checks it (the others pass or ignore it).
            f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"',
            f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()',
        ]
        if rate:
            # Each connection waits a random 0..2x the mean between its requests: with
            # one fixed delay all connections fire on the same millisecond tick, and
            # the median latency measures the queue behind that burst, not the proxy.
            delay_ms = max(1, round(connections * 1000 / rate))
            lua.append(f"function delay() return math.random(0, {2 * delay_ms}) end")
        script.write_text("\n".join(lua) + "\n")
        result = subprocess.run(
            [
                "taskset",
                "-c",
                cpus,
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{duration_s:g}s",
                "--latency",
                "--timeout",
                "30s",
                "-s",
                str(script),
                f"{scheme}://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=duration_s + 60,
        )
    out = result.stdout
    parsed = WrkResult()
    if m := re.search(r"(\d+) requests in", out):
        parsed.requests = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        parsed.rps = float(m.group(1))
    if m := re.search(r"\n\s+50%\s+(\S+)", out):
        parsed.p50_s = _seconds(m.group(1))
    if m := re.search(r"\n\s+99%\s+(\S+)", out):
        parsed.p99_s = _seconds(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        parsed.errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        parsed.errors += sum(int(g) for g in m.groups())
    return parsed


@dataclass
class StreamTiming:
    ttft_s: list[float] = field(default_factory=list)
    # Arrival of each event, in seconds after the request was sent, per stream.
    offsets: list[list[float]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0


def _request(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: "
        b"application/json\r\nAuthorization: Bearer %s\r\n"
        % BENCH_KEY.encode()
        + extra
        + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def _read_stream(
    reader: asyncio.StreamReader, started: float, offsets: list[float] | None
) -> bool:
    """Read one chunked SSE response to its end; True when it ended with [DONE]."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and await _read_events(reader, started, offsets)


async def _read_events(
    reader: asyncio.StreamReader, started: float, offsets: list[float] | None
) -> bool:
    """Read a chunked SSE body to its end, noting each event's arrival in ``offsets``;
    True when the last event was [DONE]."""
    buffer = b""
    last = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = (await reader.readexactly(size + 2))[:-2]
        if size == 0:
            return last == b"data: [DONE]"
        now = time.perf_counter() - started
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if offsets is not None:
                offsets.append(now)
            last = event


async def stream_timing(
    port: int, body: bytes, streams: int, concurrency: int, extra_headers: bytes = b""
) -> StreamTiming:
    """Send ``streams`` streaming requests, ``concurrency`` at a time, timing every event."""
    timing = StreamTiming()
    request = _request(body, extra_headers)
    queue = list(range(streams))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                queue.pop()
                offsets: list[float] = []
                started = time.perf_counter()
                writer.write(request)
                if await _read_stream(reader, started, offsets):
                    timing.completed += 1
                    timing.ttft_s.append(offsets[0])
                    timing.offsets.append(offsets)
                else:
                    timing.failed += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timing


async def many_streams(
    port: int, body: bytes, count: int, extra_headers: bytes, on_all_open: asyncio.Event
) -> tuple[int, int]:
    """Open ``count`` slow streams at once; (completed, failed). Sets ``on_all_open`` once
    every stream has its response head."""
    request = _request(body, extra_headers)
    opened = 0
    results = {"ok": 0, "failed": 0}

    async def one() -> None:
        nonlocal opened
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            results["failed"] += 1
            opened += 1
            if opened == count:
                on_all_open.set()
            return
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            opened += 1
            if opened == count:
                on_all_open.set()
            ok = head.startswith(b"HTTP/1.1 200") and await _read_events(reader, 0.0, None)
            results["ok" if ok else "failed"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            results["failed"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    on_all_open.set()
    return results["ok"], results["failed"]
