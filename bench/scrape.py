"""How long one engine's ``/metrics`` page holds the event loop.

    python -m bench.scrape

Two 4 MiB pages of 200,000 lines: a hostile one whose first 70,000 lines are
``vllm:num_requests_running`` series (refused at the 65th), and an honest but
huge one, all histogram lines but its three figures (read to the end). Each is
served from a loopback socket and scraped through the real path (``probe`` and
``load.PageScan``) while a ticker measures the event loop's longest stall;
``PageScan.feed`` alone is timed too, on 64 KiB pieces (what one read brings).
The best of several runs is reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from lmproxy.backend.probe import MAX_PROBE_BODY, probe
from lmproxy.config import ServiceSpec
from lmproxy.fleet.load import PageRefused, PageScan
from lmproxy.fleet.roster import Service

PIECE = 65536


def hostile_page() -> bytes:
    lines = [f'vllm:num_requests_running{{e="{i}"}} 1' for i in range(70_000)]
    lines += [f"x{i} 1" for i in range(130_000)]
    return pad("\n".join(lines) + "\n")


def honest_page() -> bytes:
    lines = [f'h{{le="{i}"}} 5' for i in range(199_997)]
    lines += [
        'vllm:num_requests_running{model_name="m"} 3.0',
        'vllm:num_requests_waiting{model_name="m"} 7.0',
        'vllm:kv_cache_usage_perc{model_name="m"} 0.5',
    ]
    return pad("\n".join(lines) + "\n")


def pad(text: str) -> bytes:
    """``text`` brought to 4 MiB, the most a probe reads, by a comment line."""
    page = text.encode()
    room = MAX_PROBE_BODY - len(page)
    assert room > 1, "the page's lines do not fit in 4 MiB"
    return page + b"#" * (room - 1) + b"\n"


def feed_alone(page: bytes) -> tuple[float, float]:
    """(longest feed, all feeds) in ms, fed in 64 KiB pieces."""
    scan = PageScan()
    longest = total = 0.0
    try:
        for at in range(0, len(page), PIECE):
            start = time.perf_counter()
            try:
                scan.feed(page[at : at + PIECE])
            finally:
                took = time.perf_counter() - start
                longest, total = max(longest, took), total + took
        scan.figures()
    except PageRefused:
        pass
    return longest * 1000, total * 1000


async def through_probe(page: bytes) -> tuple[float, float, str]:
    """(longest loop stall, whole scrape) in ms, and how the scrape ended."""

    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(page))
        writer.write(page)
        with contextlib.suppress(ConnectionError):  # a refused page is not read to the end
            await writer.drain()
        writer.close()
        served.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    service = Service(ServiceSpec(url=f"http://127.0.0.1:{port}", name="bench"))
    stalls = [0.0]
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            stalls[0] = max(stalls[0], now - last)
            last = now

    ticker = asyncio.create_task(tick())
    scan = PageScan()
    start = time.perf_counter()
    try:
        await probe(service, "/metrics", 10.0, "", scan.feed)
        figures = scan.figures()
        outcome = f"read: {figures}"
    except PageRefused as exc:
        outcome = f"refused: {exc}"
    took = time.perf_counter() - start
    done.set()
    await ticker
    await served.wait()
    server.close()
    await server.wait_closed()
    return stalls[0] * 1000, took * 1000, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    args = parser.parse_args()
    for label, page in (("hostile", hostile_page()), ("honest", honest_page())):
        lines = page.count(b"\n")
        feeds = [feed_alone(page) for _ in range(args.repeat)]
        probes = [asyncio.run(through_probe(page)) for _ in range(args.repeat)]
        longest, total = min(feeds)
        stall, took, outcome = min(probes)
        print(f"{label}: {len(page) / 2**20:.1f} MiB, {lines:,} lines; {outcome}")
        print(f"  PageScan.feed per 64 KiB: longest {longest:.2f} ms, all {total:.2f} ms")
        print(f"  scrape over loopback: longest loop stall {stall:.2f} ms, whole {took:.1f} ms")


if __name__ == "__main__":
    main()
