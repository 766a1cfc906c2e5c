"""What hostile clients cost a well-behaved one: bystander latency, with and without them.

    python -m bench.attacks --seconds 6 --connections 2

Starts a simulated backend and the router (the settings of ``tests/test_attacks.py``),
then measures a bystander's ``GET /health`` and a small proxied chat completion, one
after the other on fresh connections, twice: alone, and while ``tests/attackers.py``
runs every attack at once (``--connections`` of each). It prints the p50 and p99 of
each and their ratio under attack to alone, and the router's RSS growth per
attacking connection.

The test of the same attacks asserts what cannot drift (every bystander answered,
memory, counters, no service marked down); the time a bystander waits depends on the
machine and what else runs on it, so it is measured here, as a ratio within one run.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import time

from bench.procs import ROOT, mock, router

ATTACKERS = ROOT / "tests" / "attackers.py"
CHAT = b'{"model":"Qwen3-32B","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'


def _attacks() -> list[str]:
    sys.path.insert(0, str(ATTACKERS.parent))
    from attackers import ATTACKS  # tests/attackers.py: the hostile clients' kinds

    return sorted(ATTACKS)


def _timed(port: int, method: str, path: str, body: bytes | None) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status}")
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000


def _bystander(port: int, seconds: float) -> tuple[list[float], list[float]]:
    health: list[float] = []
    chat: list[float] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        health.append(_timed(port, "GET", "/health", None))
        chat.append(_timed(port, "POST", "/v1/chat/completions", CHAT))
    return health, chat


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attacks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=6, help="of each phase (default 6)")
    parser.add_argument("--connections", type=int, default=2, help="per attack kind")
    args = parser.parse_args()
    kinds = _attacks()
    backend = mock("attacked", "Qwen3-32B", "--token-delay", "0.002")
    proxy = router(
        "--backend",
        f"http://127.0.0.1:{backend.port}",
        *("--header-timeout", "2", "--body-timeout", "2", "--send-timeout", "2"),
        *("--request-timeout", "5", "--max-body-size", "1MiB"),
    )
    try:
        for _ in range(50):  # warm: the figures are the attack's, not a first request's
            _timed(proxy.port, "POST", "/v1/chat/completions", CHAT)
        alone = _bystander(proxy.port, args.seconds)
        before = proxy.rss_kib()
        attackers = subprocess.Popen(
            [
                *(sys.executable, str(ATTACKERS), str(proxy.port), str(args.seconds + 1)),
                *kinds,
                *("--connections", str(args.connections)),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # the attacks under way
            attacked = _bystander(proxy.port, args.seconds)
            peak = proxy.rss_kib()
            attackers.wait(timeout=60)
        finally:
            if attackers.poll() is None:
                attackers.kill()
    finally:
        proxy.stop()
        backend.stop()
    attacking = len(kinds) * args.connections
    print(f"{attacking} attacking connections ({len(kinds)} kinds x {args.connections})")
    print(
        f"{'bystander':<12} {'alone p50':>10} {'p99':>8} {'attacked p50':>13} {'p99':>8} "
        f"{'p99 ratio':>10}"
    )
    for name, quiet, loud in (("/health", alone[0], attacked[0]), ("chat", alone[1], attacked[1])):
        print(
            f"{name:<12} {_p(quiet, 50):8.2f}ms {_p(quiet, 99):6.2f}ms "
            f"{_p(loud, 50):11.2f}ms {_p(loud, 99):6.2f}ms {_p(loud, 99) / _p(quiet, 99):9.2f}x"
        )
    print(
        f"RSS growth under attack: {(peak - before) / attacking:.1f} KiB per attacking connection"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
