"""Routing benchmark: which strategy gives the best latency on realistic LLM traffic.

    python -m bench.routing                       # every strategy, both workloads
    python -m bench.routing --duration 10 --strategies round-robin,cache-aware

For each strategy a fresh router and fresh simulated services are started (so
no strategy inherits another's warm caches). Three services of different
speeds, each with a bounded batch, decode that slows as the batch grows, and
a prefix cache (``lmproxy.mock.Engine``). Requests arrive open-loop (Poisson,
at ``--rate`` per second) for ``--duration`` seconds, all streamed.

Workloads:

- ``shared-prefix``: multi-turn conversations, each with its own long system
  prompt; every turn resends the whole history, as chat clients do. A turn
  sent where its conversation's prefix is cached skips most of its prefill.
- ``mixed-length``: no shared prefixes; most requests short, some long (long
  prompts and long answers). Only load balance matters.
- ``external-load``: mixed-length, while another client keeps ten long streams
  open on the fast service directly, bypassing the router: the router's own
  count says that service is idle, the engine's ``/metrics`` says it is full.
  ``@noload`` runs the router with ``--load-interval 0`` (its own view only).

The peers run in front of the same services, with the same seed and workload:
``sglang-router:cache_aware`` starts sglang-router with ``--policy cache_aware``
(``bench/setup.sh`` installs it; a peer that is not installed is skipped with a
line that says so). By default every lmproxy strategy, the ``@workers2``,
``@replicas2`` and ``@noload`` deployments of the default strategy, and the
peers' policies in ``PEER_ROWS`` run (the peers on shared-prefix and mixed-length
only, unless ``--peers-everywhere``). Each conversation of shared-prefix carries
its own ``X-Session-ID`` header, as a chat application sends its conversation id:
vllm-router's consistent_hash routes by it, the cache-aware policies may use it.
Request bodies are compact JSON, so every router forwards prompts of the same size
(the Rust routers re-encode bodies; lmproxy forwards the client's bytes).

A strategy may carry options and name how the router is deployed:
``cache-aware(miss=least-loaded)`` passes ``--strategy-opt miss=least-loaded``
(options separated by ``;``); ``cache-aware@workers2`` runs one router with
``--workers 2``; ``cache-aware@replicas2`` runs two routers that share nothing,
and the client sends each request to the next of them in turn (fresh
connections, as behind a load balancer).

Reported per strategy: throughput (completed requests/s), time to first token
p50/p99, end-to-end latency p50/p99, and the prefix-cache hit rate (cached
prompt tokens / prompt tokens, from the services' ``usage``). Writes
``bench/ROUTING.md`` and ``bench/ROUTING.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import PEERS, Running, RustRouter
from bench.procs import Proc, mock, router
from lmproxy.system import raise_open_file_limit

HERE = Path(__file__).resolve().parent
STRATEGIES = [
    "round-robin",
    "weighted",
    "least-outstanding",
    "power-of-two",
    "least-latency",
    "affinity",
    "cache-aware",
]
DEPLOYMENTS = ["cache-aware@workers2", "cache-aware@replicas2", "cache-aware@noload"]
PEER_ROWS = [
    "sglang-router:cache_aware",
    "sglang-router:round_robin",
    "vllm-router:cache_aware",
    "vllm-router:consistent_hash",
    "vllm-router:round_robin",
]
WORKLOADS = ["shared-prefix", "mixed-length", "external-load"]
# external-load: streams another client keeps open on the fast service, not through
# the router, so that only the engine's own /metrics shows that service busy.
EXTERNAL_STREAMS = 10  # the fast service's batch is 8: two more wait in its queue
# (name, seconds per token, weight): one fast, one medium, one slow service.
SERVICES = [("fast", 0.010, 3), ("medium", 0.015, 2), ("slow", 0.025, 1)]
ENGINE = [
    "--max-batch", "8", "--batch-slowdown", "0.08", "--prefill-per-token", "0.0002",
    "--prefix-cache-blocks", "1500",
]  # fmt: skip


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(100000)}" for _ in range(n))


class SharedPrefix:
    """Conversations with long system prompts; each request is a conversation's next turn."""

    def __init__(self, rng: random.Random, conversations: int = 40) -> None:
        self.rng = rng
        self.histories = [
            [{"role": "system", "content": f"You are agent {i}. " + _words(rng, 900)}]
            for i in range(conversations)
        ]
        self.sessions = [f"conversation-{i}" for i in range(conversations)]
        self.started = conversations

    def next(self) -> tuple[dict, str | None]:
        """The next turn of one conversation, and that conversation's session id."""
        index = self.rng.randrange(len(self.histories))
        history, session = self.histories[index], self.sessions[index]
        history.append({"role": "user", "content": _words(self.rng, 30)})
        body = {"model": "Qwen3-32B", "messages": list(history), "max_tokens": 24}
        history.append({"role": "assistant", "content": _words(self.rng, 24)})
        if len(history) > 21:  # the conversation ends; a new one takes its place
            # A new system message, not the old one changed: the turn just built still
            # holds that one, and must go out as its conversation sent it.
            history[:] = [
                {"role": "system", "content": "You are a new agent. " + _words(self.rng, 900)}
            ]
            self.sessions[index] = f"conversation-{self.started}"
            self.started += 1
        return body, session


class MixedLength:
    """Unique prompts: 80% short questions with short answers, 20% long ones."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def next(self) -> tuple[dict, str | None]:
        long = self.rng.random() < 0.2
        content = _words(self.rng, 600 if long else 40)
        body = {
            "model": "Qwen3-32B",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 160 if long else 12,
        }
        return body, None


async def _request(port: int, body: dict, result: Result, session: str | None = None) -> None:
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    data = json.dumps(streamed, separators=(",", ":")).encode()
    extra = b"X-Session-ID: %s\r\n" % session.encode() if session else b""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        result.failed += 1
        return
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: "
            b"application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(data), data)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            result.failed += 1
            return
        first = None
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None:
                first = time.perf_counter()
            body += chunk[:-2]
        end = time.perf_counter()
        for event in body.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage"' in event:
                usage = json.loads(event[6:])["usage"]
                result.prompt_tokens += usage["prompt_tokens"]
                result.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        result.ttft.append((first or end) - started)
        result.e2e.append(end - started)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        result.failed += 1
    finally:
        writer.close()


def _peer(name: str) -> tuple[str, str] | None:
    """``peer:policy`` -> (peer, policy); None for an lmproxy row."""
    peer, sep, policy = name.partition(":")
    if not sep:
        return None
    known = PEERS.get(peer)
    if not isinstance(known, RustRouter) or policy not in known.policies:
        rows = ", ".join(PEER_ROWS)
        raise SystemExit(f"unknown peer row {name!r}: use one of {rows}")
    return peer, policy


def _start(name: str, ports: list[int]) -> list[Proc | Running]:
    """The routers of one row, in front of the services on ``ports``."""
    peer = _peer(name)
    if peer is not None:
        known = PEERS[peer[0]]
        assert isinstance(known, RustRouter)
        return [known.start(ports, None, policy=peer[1])]
    flags, replicas = _deployment(name)
    backends = []
    for (service, _, weight), port in zip(SERVICES, ports, strict=True):
        backends += ["--backend", f"{service}=http://127.0.0.1:{port},weight={weight}"]
    return [router(*backends, *flags) for _ in range(replicas)]


def _deployment(name: str) -> tuple[list[str], int]:
    """``strategy[(key=value;...)][@workersN|@replicasN]`` -> (router flags, routers)."""
    strategy, _, deployment = name.partition("@")
    strategy, _, options = strategy.partition("(")
    flags = ["--strategy", strategy]
    for option in filter(None, options.rstrip(")").split(";")):
        flags += ["--strategy-opt", option]
    if not deployment:
        return flags, 1
    for kind in ("workers", "replicas"):
        if deployment.startswith(kind) and deployment[len(kind) :].isdigit():
            count = int(deployment[len(kind) :])
            if kind == "workers":
                return [*flags, "--workers", str(count)], 1
            return flags, count
    if deployment == "noload":
        return [*flags, "--load-interval", "0"], 1
    raise SystemExit(f"unknown deployment {deployment!r}: use @workersN, @replicasN or @noload")


def _external_body() -> dict:
    """A stream long enough to outlast the run: 4,000 tokens at the fast service's pace."""
    return {
        "model": "Qwen3-32B",
        "messages": [{"role": "user", "content": "keep talking"}],
        "max_tokens": 4000,
    }


async def _run_one(name: str, workload: str, args: argparse.Namespace) -> dict:
    services: list[Proc] = []
    proxies: list[Proc | Running] = []
    try:
        for service, delay, _ in SERVICES:
            services.append(mock(service, "Qwen3-32B", "--token-delay", str(delay), *ENGINE))
        proxies = _start(name, [proc.port for proc in services])
        ports = [p.port for p in proxies]
        await asyncio.sleep(0.5)  # first health checks
        rng = random.Random(args.seed)
        source: SharedPrefix | MixedLength = (
            SharedPrefix(rng) if workload == "shared-prefix" else MixedLength(rng)
        )
        result = Result()
        tasks = []
        outside: list[asyncio.Task[None]] = []
        if workload == "external-load":  # not counted: another client's traffic
            fast = services[0].port
            outside = [
                asyncio.create_task(_request(fast, _external_body(), Result()))
                for _ in range(EXTERNAL_STREAMS)
            ]
            await asyncio.sleep(1.5)  # the engines' next scrape sees them
        started = time.perf_counter()
        deadline = started + args.duration
        turn = 0
        while time.perf_counter() < deadline:
            port = ports[turn % len(ports)]
            turn += 1
            body, session = source.next()
            tasks.append(asyncio.create_task(_request(port, body, result, session)))
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.wait_for(asyncio.gather(*tasks), args.duration + 120)
        elapsed = time.perf_counter() - started
        for task in outside:
            task.cancel()
        await asyncio.gather(*outside, return_exceptions=True)
    finally:
        for proxy in proxies:
            proxy.stop()
        for proc in services:
            proc.stop()

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        return (
            statistics.quantiles(values, n=100, method="inclusive")[q - 1]
            if len(values) > 1
            else values[0]
        )

    return {
        "strategy": name,
        "workload": workload,
        "requests": len(result.e2e),
        "failed": result.failed,
        "throughput": len(result.e2e) / elapsed,
        "ttft_p50": pct(result.ttft, 50),
        "ttft_p99": pct(result.ttft, 99),
        "e2e_p50": pct(result.e2e, 50),
        "e2e_p99": pct(result.e2e, 99),
        "hit_rate": result.cached_tokens / result.prompt_tokens if result.prompt_tokens else 0.0,
    }


def _table(rows: list[dict]) -> str:
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        lines += [
            f"\n### {workload}\n",
            "| strategy | req/s | TTFT p50 (ms) | TTFT p99 (ms) | e2e p50 (ms) | e2e p99 (ms) "
            "| prefix-cache hit rate | failed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in (r for r in rows if r["workload"] == workload):
            lines.append(
                f"| {r['strategy']} | {r['throughput']:.1f} | {r['ttft_p50'] * 1000:.0f} | "
                f"{r['ttft_p99'] * 1000:.0f} | {r['e2e_p50'] * 1000:.0f} | "
                f"{r['e2e_p99'] * 1000:.0f} | {r['hit_rate']:.0%} | {r['failed']} |"
            )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"skip {path}: matplotlib is not installed (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        subset = [r for r in rows if r["workload"] == workload]
        names = [r["strategy"] for r in subset]
        x = range(len(subset))
        width = 0.2
        for offset, (key, label) in enumerate(
            [
                ("ttft_p50", "TTFT p50"),
                ("ttft_p99", "TTFT p99"),
                ("e2e_p50", "e2e p50"),
                ("e2e_p99", "e2e p99"),
            ]
        ):
            ax.bar(
                [i + (offset - 1.5) * width for i in x],
                [r[key] * 1000 for r in subset],
                width,
                label=label,
            )
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylabel("milliseconds")
        ax.set_title(f"{workload} (lower is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def _main(args: argparse.Namespace) -> int:
    raise_open_file_limit()
    rows = []
    strategies = []
    for name in args.strategies:
        peer = _peer(name)
        missing = PEERS[peer[0]].missing() if peer else None
        if missing:
            print(f"skip {name}: {missing}")
        else:
            strategies.append(name)
    for workload in args.workloads:
        for strategy in strategies:
            if workload == "external-load" and _peer(strategy) and not args.peers_everywhere:
                continue  # it weighs lmproxy's engine view against its own count alone
            row = await _run_one(strategy, workload, args)
            rows.append(row)
            print(
                f"{workload:14} {strategy:18} {row['throughput']:6.1f} req/s  TTFT p50 "
                f"{row['ttft_p50'] * 1000:6.0f} ms p99 {row['ttft_p99'] * 1000:6.0f} ms  e2e p50 "
                f"{row['e2e_p50'] * 1000:6.0f} ms p99 {row['e2e_p99'] * 1000:6.0f} ms  hit "
                f"{row['hit_rate']:4.0%}  failed {row['failed']}",
                flush=True,
            )
    table = _table(rows)
    if args.output:
        command = " ".join(["python -m bench.routing", *sys.argv[1:]])
        Path(args.output).write_text(
            "# Routing benchmark\n\n"
            f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}: {args.duration:g} s of "
            f"open-loop arrivals at {args.rate:g} requests/s per run, three simulated services "
            "(token delay 10, 15 and 25 ms; weights 3, 2, 1; batch of 8; prefill 0.2 ms per "
            "uncached prompt token; prefix cache of 1500 blocks of 128 bytes). "
            "See `bench/routing.py`.\n" + table
        )
        _plot(rows, Path(args.output).with_suffix(".png"))
        print(f"wrote {args.output} and {Path(args.output).with_suffix('.png')}")
    print(table)
    return 1 if any(r["failed"] for r in rows) else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=30, help="seconds of arrivals per run")
    parser.add_argument("--rate", type=float, default=12, help="arrivals per second")
    parser.add_argument("--seed", type=int, default=1, help="workload random seed")
    parser.add_argument(
        "--strategies",
        type=lambda s: s.split(","),
        default=STRATEGIES + DEPLOYMENTS + PEER_ROWS,
        help="comma-separated rows: strategy[(opt=v;...)][@workersN|@replicasN|@noload] "
        "or peer:policy (default: every built-in, the default's deployments, and the peers)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=WORKLOADS,
        help=f"comma-separated, of {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--peers-everywhere",
        action="store_true",
        help="run the peers' rows on external-load too (by default they run on "
        "shared-prefix and mixed-length: external-load compares lmproxy's view of the "
        "engines' load with its own count alone, which the peers do not read)",
    )
    parser.add_argument(
        "--output",
        default=str(HERE / "ROUTING.md"),
        help="markdown file to write (its .png beside it); '' for none",
    )
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
