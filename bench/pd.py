"""Prefill/decode disaggregation: lmproxy and the Rust routers in front of the same
simulated prefill and decode services, in one run.

    python -m bench.pd                       # writes bench/PD.md
    python -m bench.pd --duration 5 --rate 200 --output ''

For each protocol, one prefill and one decode simulator (``--pd-role``; the
decode refuses what no prefill prepared, so every request really takes both
steps) run on core 1 with the load generator; each router runs alone on core 0:

- ``vllm``: lmproxy ``--pd-mode vllm`` and ``vllm-router --vllm-pd-disaggregation``;
- ``sglang``: lmproxy ``--pd-mode sglang`` and ``sglang-router --pd-disaggregation``.

Figures, per router: CPU per request (user + system of its process tree over
wrk's requests) at a fixed rate of small non-streamed chat completions, and the
time to first token of streamed ones at concurrency 4, with what the router adds
to it: the difference from ``direct``, a client that speaks the protocol to the
two services itself (the floor). The simulators spend no time of their own, so
the figures are the routers' cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.load import _read_events, run_wrk, stream_timing, wrk_missing
from bench.peers import PEERS, Running, _launch, free_port
from bench.procs import Proc, mock
from bench.report import fmt

HERE = Path(__file__).resolve().parent
PROXY_CPUS, LOAD_CPUS = "0", "1"
MODEL = "Qwen3-32B"


def chat(stream: bool, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello, how are you?"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


class Fleet:
    """One prefill and one decode simulator speaking ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        extra = ["--bootstrap-port", "0"] if mode == "sglang" else []
        self.prefill = mock(
            "prefill", MODEL, "--pd-role", "prefill", "--pd-mode", mode, *extra, cpus=LOAD_CPUS
        )
        self.decode = mock(
            "decode", MODEL, "--pd-role", "decode", "--pd-mode", mode, cpus=LOAD_CPUS
        )
        self.bootstrap = 0
        if mode == "sglang":
            found = re.search(
                rb"bootstrap server on [\d.]+:(\d+)", Path(self.prefill.log.name).read_bytes()
            )
            assert found is not None
            self.bootstrap = int(found.group(1))

    def url(self, proc: Proc) -> str:
        return f"http://127.0.0.1:{proc.port}"

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()


def start_lmproxy(fleet: Fleet) -> Running:
    workdir = tempfile.mkdtemp(prefix="bench-pd-lmproxy-")
    port = free_port()
    prefill = ["--prefill", fleet.url(fleet.prefill)]
    if fleet.mode == "sglang":
        prefill.append(str(fleet.bootstrap))
    argv = [
        sys.executable, "-m", "lmproxy", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", *prefill, "--decode", fleet.url(fleet.decode),
        "--pd-mode", fleet.mode,
    ]  # fmt: skip
    return _launch("lmproxy", argv, PROXY_CPUS, port, workdir, cwd=str(HERE.parent))


def start_rust(name: str, fleet: Fleet) -> Running:
    peer = PEERS[name]
    workdir = tempfile.mkdtemp(prefix=f"bench-pd-{name}-")
    port = free_port()
    prefill = ["--prefill", fleet.url(fleet.prefill)]
    if fleet.mode == "sglang":
        prefill.append(str(fleet.bootstrap))
    argv = [
        str(peer.binary()),  # type: ignore[attr-defined]
        *peer.subcommand,  # type: ignore[attr-defined]
        "--host", "127.0.0.1", "--port", str(port),
        "--vllm-pd-disaggregation" if fleet.mode == "vllm" else "--pd-disaggregation",
        *prefill, "--decode", fleet.url(fleet.decode),
        "--policy", "round_robin",
        "--max-concurrent-requests", "100000", "--queue-size", "100000",
        "--prometheus-port", str(free_port()),
        "--log-level", peer.warn_level,  # type: ignore[attr-defined]
    ]  # fmt: skip
    return _launch(name, argv, PROXY_CPUS, port, workdir)


# --- the floor: a client that speaks the protocol itself ---------------------------


async def _post(port: int, body: dict[str, Any]) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return reader, writer


async def _json(reader: asyncio.StreamReader) -> dict[str, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    return json.loads(await reader.readexactly(length))  # type: ignore[no-any-return]


async def direct_ttft(fleet: Fleet, streams: int) -> list[float]:
    """TTFT with no router: the client does the prefill step and the decode step."""
    found: list[float] = []
    for _ in range(streams):
        started = time.perf_counter()
        if fleet.mode == "vllm":
            first = {**chat(False, 1), "kv_transfer_params": {"do_remote_decode": True}}
            reader, writer = await _post(fleet.prefill.port, first)
            params = (await _json(reader))["kv_transfer_params"]
            writer.close()
            reader, writer = await _post(
                fleet.decode.port, {**chat(True), "kv_transfer_params": params}
            )
            side = None
        else:
            room = {
                "bootstrap_host": "127.0.0.1",
                "bootstrap_port": fleet.bootstrap,
                "bootstrap_room": random.getrandbits(63),
            }
            side = await _post(fleet.prefill.port, {**chat(True), **room})
            reader, writer = await _post(fleet.decode.port, {**chat(True), **room})
        head = await reader.readuntil(b"\r\n\r\n")
        offsets: list[float] = []
        if head.startswith(b"HTTP/1.1 200") and await _read_events(reader, started, offsets):
            found.append(offsets[0])
        writer.close()
        if side is not None:
            side[1].close()
    return found


# --- measuring ------------------------------------------------------------------------


def measure(running: Running, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"rps": math.nan, "errors": 0, "cpu_us": math.nan}
    if not args.no_wrk:
        body = json.dumps(chat(False)).encode()
        before = running.cpu_s()
        result = run_wrk(
            running.port, body, connections=32, duration_s=args.duration, cpus=LOAD_CPUS,
            rate=args.rate,
        )  # fmt: skip
        spent = running.cpu_s() - before
        figures.update(
            rps=result.rps,
            errors=result.errors,
            cpu_us=spent / result.requests * 1e6 if result.requests else math.nan,
        )
    timing = asyncio.run(
        stream_timing(running.port, json.dumps(chat(True)).encode(), args.streams, 4)
    )
    return {
        **figures,
        "ttft_s": statistics.median(timing.ttft_s) if timing.ttft_s else math.nan,
        "failed": timing.failed,
    }


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for mode in ("vllm", "sglang"):
        print(f"== {mode}", flush=True)
        fleet = Fleet(mode)
        rows[mode] = []
        try:
            floor = asyncio.run(direct_ttft(fleet, args.streams))
            floor_s = statistics.median(floor) if floor else math.nan
            rows[mode].append({"name": "direct (the client does both steps)", "ttft_s": floor_s})
            print(f"   direct: TTFT {fmt(floor_s * 1e3, 2)} ms", flush=True)
            peers: list[tuple[str, Any]] = [("lmproxy", start_lmproxy)]
            rust = ["vllm-router"] if mode == "vllm" else ["sglang-router"]
            for name in rust:
                reason = PEERS[name].missing()
                if reason:
                    print(f"   skip {name}: {reason}")
                    continue
                peers.append((name, lambda f, n=name: start_rust(n, f)))
            for name, start in peers:
                try:
                    running = start(fleet)
                except RuntimeError as exc:
                    print(f"   skip {name}: {str(exc).splitlines()[0]}")
                    continue
                try:
                    row = {"name": name, **measure(running, args)}
                finally:
                    running.stop()
                row["added_ttft_s"] = row["ttft_s"] - floor_s
                rows[mode].append(row)
                print(
                    f"   {name:14} {fmt(row['cpu_us'])} us CPU/req at {row['rps']:.0f} req/s "
                    f"({row['errors']} errors); TTFT {fmt(row['ttft_s'] * 1e3, 2)} ms, "
                    f"+{fmt(row['added_ttft_s'] * 1e3, 2)} ms",
                    flush=True,
                )
        finally:
            fleet.stop()
    return rows


def markdown(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    command = "python -m bench.pd" + (
        f" --duration {args.duration:g} --rate {args.rate:g} --streams {args.streams}"
    )
    lines = [
        "# Prefill/decode disaggregation: lmproxy and the Rust routers",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, "
        f"Python {platform.python_version()}. Each router alone on core 0; one prefill and "
        "one decode simulator and the load on core 1. Every request takes both steps (the "
        "decode simulator refuses what no prefill prepared).",
        "",
        f"CPU per request: user + system of the router's processes over wrk's requests, at "
        f"{args.rate:g} small non-streamed chat completions per second (32 connections, "
        f"{args.duration:g} s). TTFT: median over {args.streams} streamed ones at "
        "concurrency 4; added TTFT: the router's TTFT less `direct`'s, a client that "
        "speaks the protocol to both services itself.",
        "",
    ]
    for mode, found in rows.items():
        lines += [
            f"## {mode}",
            "",
            "| router | CPU us/request | vs lmproxy | req/s (errors) | TTFT ms | added TTFT ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        ours = next((r for r in found if r["name"] == "lmproxy"), None)
        for row in found:
            if "cpu_us" not in row:
                lines.append(f"| {row['name']} | | | | {fmt(row['ttft_s'] * 1e3, 2)} | |")
                continue
            ratio = row["cpu_us"] / ours["cpu_us"] if ours else math.nan
            lines.append(
                f"| {row['name']} | {fmt(row['cpu_us'])} | {ratio:.2f}x | "
                f"{row['rps']:.0f} ({row['errors']}) | {fmt(row['ttft_s'] * 1e3, 2)} | "
                f"{fmt(row['added_ttft_s'] * 1e3, 2)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per router")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s for the CPU figure")
    parser.add_argument("--streams", type=int, default=200, help="streamed requests timed")
    parser.add_argument("--output", default=str(HERE / "PD.md"), help="'' to only print")
    parser.add_argument("--figures", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    reason = wrk_missing()
    args.no_wrk = bool(reason)
    if reason:
        print(f"skip CPU figures: {reason}")
    rows = run(args)
    if args.figures:
        Path(args.figures).write_text(json.dumps(rows, default=str))
    text = markdown(rows, args)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
