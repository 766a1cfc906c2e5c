"""Soak: a sustained streaming load through the router; its memory must stay flat.

    python -m bench.soak --duration 300 --concurrency 200

Keeps ``concurrency`` streams running against two simulated backends for
``duration`` seconds, samples the router's resident memory, and fails (exit 1)
if any stream failed, or if memory in the last quarter of the measured samples
grew more than ``--max-growth`` over the first quarter's. Samples taken during
the first ``--warmup`` seconds are shown but not measured: the allocator's
pools fill up then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.procs import mock, router
from lmproxy.system import raise_open_file_limit

BODY = json.dumps(
    {
        "model": "Qwen3-32B",
        "messages": [{"role": "user", "content": "soak"}],
        "max_tokens": 64,
        "stream": True,
    }
).encode()
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


async def _stream(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return False
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return True
    except (OSError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def _worker(port: int, until: float, counts: dict[str, int]) -> None:
    while time.monotonic() < until:
        counts["ok" if await _stream(port) else "failed"] += 1


async def _soak(args: argparse.Namespace) -> int:
    raise_open_file_limit()
    backends = [mock(f"soak-{i}", "Qwen3-32B", "--token-delay", "0.005") for i in range(2)]
    proxy = router(*[a for b in backends for a in ("--backend", f"http://127.0.0.1:{b.port}")])
    try:
        await asyncio.sleep(1)
        counts = {"ok": 0, "failed": 0}
        started = time.monotonic()
        until = started + args.duration
        workers = [
            asyncio.create_task(_worker(proxy.port, until, counts)) for _ in range(args.concurrency)
        ]
        samples: list[tuple[float, int]] = []
        while time.monotonic() < until:
            await asyncio.sleep(args.sample_every)
            samples.append((time.monotonic() - started, proxy.rss_kib()))
            print(
                f"t={samples[-1][0]:6.1f}s  rss={samples[-1][1] / 1024:7.1f} MiB  "
                f"streams ok={counts['ok']} failed={counts['failed']}",
                flush=True,
            )
        await asyncio.gather(*workers)
    finally:
        proxy.stop()
        for b in backends:
            b.stop()
    measured = [s for s in samples if s[0] >= args.warmup] or samples
    quarter = max(1, len(measured) // 4)
    first = sum(r for _, r in measured[:quarter]) / quarter
    last = sum(r for _, r in measured[-quarter:]) / quarter
    growth = (last - first) / first
    print(
        f"\n{counts['ok']} streams completed, {counts['failed']} failed; router RSS "
        f"{first / 1024:.1f} MiB (first quarter after warm-up) -> {last / 1024:.1f} MiB "
        "(last quarter), "
        f"{growth:+.1%}"
    )
    ok = counts["failed"] == 0 and growth <= args.max_growth
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=120, help="seconds (default 120)")
    parser.add_argument("--concurrency", type=int, default=200, help="streams at once")
    parser.add_argument("--warmup", type=float, default=30, help="seconds not measured")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples")
    parser.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        help="allowed RSS growth, last quarter over first (default 0.10)",
    )
    return asyncio.run(_soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
