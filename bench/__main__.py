"""lmproxy side by side with the peers, in one run on one machine.

    bash bench/setup.sh                 # once: wrk, nginx, and the peers' virtualenv
    python -m bench                     # every installed peer, every workload
    python -m bench --peers lmproxy,nginx --workloads small --duration 5
    python -m bench --smoke             # a second or two per peer: does it all still run?

Placement: on a 2-core machine the proxy under test runs on core 0 and the load
generator and the simulated backends on core 1 (taskset), the same for every
peer. Figures are given as ratios against ``direct`` (no proxy) and ``nginx``
from the same run, since the absolute numbers of a shared machine drift.

Workloads:

1. ``small``: small non-streaming chat completions. Requests/s at a fixed
   concurrency (wrk); latency p50/p99 and the proxy's CPU time per request at a
   fixed rate, half of lmproxy's peak (CPU from /proc: user + system of the
   proxy's process tree, divided by the requests served).
2. ``stream``: streamed answers of 64 and 512 tokens. Events/s and CPU per event
   at a fixed concurrency (wrk); time to first token, and the gaps between
   events, at low concurrency with a token every 2 ms.
3. ``many``: 1,000 / 5,000 / 10,000 slow streams open at once: the proxy's
   resident memory per stream, and whether every stream completes.
4. ``large``: 100 KB and 1 MB prompts: requests/s and CPU per request.
5. ``tls``: small chat completions over HTTPS, to lmproxy (``--ssl-certfile``) and
   nginx (``listen ... ssl``) with the same certificate (made at run time with
   trustme): requests/s, and CPU per request at the same fixed rate as ``small``.

Writes ``bench/RESULTS.md`` and ``bench/results-*.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import report
from bench.load import many_streams, run_wrk, stream_timing, wrk_missing
from bench.peers import PEERS, Running
from bench.procs import Proc, mock
from bench.report import fmt, median
from lmproxy.system import raise_open_file_limit

HERE = Path(__file__).resolve().parent
PROXY_CPUS = "0"
LOAD_CPUS = "1"
WORKLOADS = ["small", "stream", "many", "large", "tls"]


def chat(max_tokens: int, stream: bool = False, content: str = "Hello, how are you?") -> bytes:
    return json.dumps(
        {
            "model": "Qwen3-32B",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, dict[str, Any]] = {}
        self.backends: list[Proc] = []

    # --- running --------------------------------------------------------------------

    def run(self) -> int:
        raise_open_file_limit()
        peers = []
        for name in self.args.peers:
            peer = PEERS.get(name)
            if peer is None:
                print(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
                return 2
            reason = peer.missing()
            if reason:
                print(f"skip {name}: {reason}")
                continue
            peers.append(peer)
        self.wrk_reason = wrk_missing()
        if self.wrk_reason:
            print(f"skip request-rate figures: {self.wrk_reason}")
        self.backends = [mock(f"bench-{i}", "Qwen3-32B", cpus=LOAD_CPUS) for i in range(2)]
        ports = [b.port for b in self.backends]
        try:
            for peer in peers:
                self._run_peer(peer.name, lambda p=peer: p.start(ports, PROXY_CPUS))
            if "small" in self.args.workloads and not self.wrk_reason:
                self._fixed_rate(peers, ports)
            if "tls" in self.args.workloads and not self.wrk_reason:
                self._tls(peers, ports)
        finally:
            for backend in self.backends:
                backend.stop()
        self._report()
        return 0

    def _run_peer(self, name: str, start: Any) -> None:
        print(f"== {name}", flush=True)
        try:
            running: Running = start()
        except RuntimeError as exc:
            print(f"skip {name}: it did not start: {str(exc).splitlines()[0]}")
            return
        figures = self.results.setdefault(name, {"name": name})
        try:
            if "small" in self.args.workloads and not self.wrk_reason:
                r = self._wrk(running, chat(16), self.args.concurrency)
                figures["small_rps"] = r.rps
                figures["small_errors"] = r.errors
                print(f"   small: {r.rps:9.0f} req/s at c={self.args.concurrency}", flush=True)
            if "stream" in self.args.workloads:
                for tokens in (64, 512):
                    self._stream(running, figures, tokens)
            if "many" in self.args.workloads:
                for count in self.args.streams:
                    if name in ("litellm", "aiohttp") and count > 1000 and not self.args.smoke:
                        figures[f"many{count}"] = None  # known to need minutes; see README
                        continue
                    self._many(running, figures, count)
            if "large" in self.args.workloads and not self.wrk_reason:
                for size in (100_000, 1_000_000):
                    body = chat(1, content="x" * size)
                    r, cpu = self._wrk_cpu(running, body, 8)
                    figures[f"large{size}_rps"] = r.rps
                    figures[f"large{size}_cpu_us"] = cpu
                    figures[f"large{size}_errors"] = r.errors
                    print(
                        f"   large {size // 1000} KB: {r.rps:7.0f} req/s, {fmt(cpu)} us CPU/req",
                        flush=True,
                    )
        finally:
            running.stop()

    def _wrk(self, running: Running, body: bytes, connections: int, rate: float | None = None):
        return run_wrk(
            running.port,
            body,
            connections=connections,
            duration_s=self.args.duration,
            cpus=LOAD_CPUS,
            rate=rate,
            scheme=running.scheme,
        )

    def _tls(self, peers: list[Any], ports: list[int]) -> None:
        """Small chat completions over HTTPS, for the peers that serve it."""
        try:
            import trustme
        except ImportError:
            print("skip tls: trustme is not installed (pip install -e '.[test]')")
            return
        rate = getattr(self, "rate", 1000.0)
        print(f"== tls: HTTPS, CPU at {rate:.0f} req/s", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-tls-") as folder:
            leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
            cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            for peer in peers:
                if not peer.serves_tls:
                    continue
                try:
                    running = peer.start_tls(ports, PROXY_CPUS, (str(cert), str(key)))
                except RuntimeError as exc:
                    print(f"skip {peer.name} over TLS: {str(exc).splitlines()[0]}")
                    continue
                try:
                    figures = self.results.setdefault(peer.name, {"name": peer.name})
                    r = self._wrk(running, chat(16), self.args.concurrency)
                    at_rate, cpu_us = self._wrk_cpu(running, chat(16), 64, rate=rate)
                    figures.update(
                        tls_rps=r.rps,
                        tls_rate_rps=at_rate.rps,
                        tls_cpu_us=cpu_us,
                        tls_errors=r.errors + at_rate.errors,
                    )
                    print(
                        f"   {peer.name:14} {r.rps:8.0f} req/s; CPU {fmt(cpu_us)} us/req "
                        f"at {at_rate.rps:.0f} req/s",
                        flush=True,
                    )
                finally:
                    running.stop()

    def _wrk_cpu(
        self, running: Running, body: bytes, connections: int, rate: float | None = None
    ) -> tuple[Any, float]:
        before = running.cpu_s()
        result = self._wrk(running, body, connections, rate)
        spent = running.cpu_s() - before
        cpu_us = spent / result.requests * 1e6 if result.requests and running.proc else math.nan
        return result, cpu_us

    def _stream(self, running: Running, figures: dict[str, Any], tokens: int) -> None:
        events = tokens + 3  # role, tokens, finish, [DONE]
        if not self.wrk_reason:
            r, cpu_us = self._wrk_cpu(running, chat(tokens, stream=True), 16)
            figures[f"stream{tokens}_eps"] = r.rps * events
            figures[f"stream{tokens}_cpu_us"] = cpu_us / events
            figures[f"stream{tokens}_errors"] = r.errors
        body = chat(tokens, stream=True)
        timing = asyncio.run(
            stream_timing(
                running.port,
                body,
                streams=self.args.timed_streams,
                concurrency=4,
                extra_headers=b"X-Mock-Token-Delay: 0.002\r\n",
            )
        )
        figures[f"stream{tokens}_ttft_s"] = median(timing.ttft_s)
        gaps = sorted(
            later - earlier
            for offsets in timing.offsets
            for earlier, later in itertools.pairwise(offsets[1:-1])
        )
        figures[f"stream{tokens}_gap_p50_s"] = gaps[len(gaps) // 2] if gaps else math.nan
        figures[f"stream{tokens}_gap_p99_s"] = gaps[int(len(gaps) * 0.99)] if gaps else math.nan
        figures[f"stream{tokens}_failed"] = timing.failed
        print(
            f"   stream {tokens}: {fmt(figures.get(f'stream{tokens}_eps'))} events/s, "
            f"{fmt(figures.get(f'stream{tokens}_cpu_us'), 2)} us CPU/event, TTFT "
            f"{fmt(figures[f'stream{tokens}_ttft_s'] * 1e3, 2)} ms",
            flush=True,
        )

    def _many(self, running: Running, figures: dict[str, Any], count: int) -> None:
        body = chat(8, stream=True)
        baseline = running.rss_kib()

        async def go() -> tuple[int, int, int]:
            opened = asyncio.Event()
            task = asyncio.create_task(
                many_streams(running.port, body, count, b"X-Mock-Token-Delay: 0.6\r\n", opened)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), 120)
            await asyncio.sleep(0.5)
            rss = running.rss_kib()
            ok, failed = await asyncio.wait_for(task, 300)
            return rss, ok, failed

        rss, ok, failed = asyncio.run(go())
        per_stream = (rss - baseline) / count if running.proc else math.nan
        figures[f"many{count}"] = {
            "ok": ok,
            "failed": failed,
            "rss_mib": rss / 1024,
            "kib_per_stream": per_stream,
        }
        print(
            f"   {count} streams: {ok} completed, {failed} failed, "
            f"{fmt(per_stream, 1)} KiB per stream",
            flush=True,
        )

    def _fixed_rate(self, peers: list[Any], ports: list[int]) -> None:
        peak = self.results.get("lmproxy", {}).get("small_rps") or max(
            (f.get("small_rps") or 0 for f in self.results.values()), default=0
        )
        if not peak:
            return
        self.rate = round(peak / 2, -2) or 100
        print(
            f"== fixed rate: {self.rate:.0f} req/s (half of lmproxy's peak); "
            "second throughput run, peers in reverse order",
            flush=True,
        )
        # The peers in reverse order: a second throughput figure taken here and
        # averaged with the first puts every peer at the same mean point of the run,
        # whatever the shared machine's load did meanwhile.
        for peer in reversed(peers):
            try:
                running = peer.start(ports, PROXY_CPUS)
            except RuntimeError:
                continue
            try:
                figures = self.results.setdefault(peer.name, {"name": peer.name})
                if figures.get("small_rps") is not None:
                    again = self._wrk(running, chat(16), self.args.concurrency)
                    figures["small_rps_runs"] = [figures["small_rps"], again.rps]
                    figures["small_rps"] = (figures["small_rps"] + again.rps) / 2
                    figures["small_errors"] = figures.get("small_errors", 0) + again.errors
                r, cpu_us = self._wrk_cpu(running, chat(16), 64, rate=self.rate)
                figures.update(
                    rate_rps=r.rps,
                    rate_p50_s=r.p50_s,
                    rate_p99_s=r.p99_s,
                    rate_cpu_us=cpu_us,
                    rate_errors=r.errors,
                )
                runs = figures.get("small_rps_runs")
                print(
                    f"   {peer.name:14} {r.rps:8.0f} req/s p50 {r.p50_s * 1e6:8.0f} us "
                    f"p99 {r.p99_s * 1e6:8.0f} us CPU {fmt(cpu_us)} us/req"
                    + (f"; throughput runs {runs[0]:.0f}, {runs[1]:.0f} req/s" if runs else ""),
                    flush=True,
                )
            finally:
                running.stop()

    # --- reporting ------------------------------------------------------------------

    def _report(self) -> None:
        if self.args.figures:
            Path(self.args.figures).write_text(json.dumps(self.results, indent=1, default=str))
        text = report.markdown(self.results, self.args, getattr(self, "rate", math.nan))
        print(text)
        if self.args.output:
            Path(self.args.output).write_text(text)
            report.charts(self.results, Path(self.args.output).parent)
            print(f"wrote {self.args.output}")


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--peers",
        type=lambda s: s.split(","),
        default=list(PEERS),
        help=f"comma-separated (default: {','.join(PEERS)})",
    )
    parser.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=WORKLOADS,
        help=f"comma-separated (default: {','.join(WORKLOADS)})",
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="connections for req/s")
    parser.add_argument(
        "--streams",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 5000, 10000],
        help="counts for the many-streams workload",
    )
    parser.add_argument(
        "--timed-streams", type=int, default=40, help="streams timed event by event (default 40)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run: 1 s per measurement, 50 streams, no files written",
    )
    parser.add_argument(
        "--figures",
        default="",
        metavar="PATH",
        help="also write the measured figures, per peer, as JSON (what the report is made of)",
    )
    parser.add_argument(
        "--output",
        default=str(HERE / "RESULTS.md"),
        help="markdown to write, charts beside it ('' for none)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.duration = 1
        args.streams = [50]
        args.timed_streams = 4
        args.output = ""
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
