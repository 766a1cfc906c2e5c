"""What an API key with limits adds to a request's latency, by where its counts live.

    python -m bench.keys                 # one process, --workers 2, and Redis if installed
    python -m bench.keys --requests 5000

For each setting, the median latency of small chat completions sent one after
another on one keep-alive connection, through a router without keys and through
the same router with a ``[[keys]]`` key that has rpm, tpm and max_in_flight limits
(each far above what the run sends, so none is refused). With ``--workers 2`` a
keyed request asks the supervisor; with ``--redis-url`` it asks Redis (a
``redis-server`` started here on a free port). Router, simulator and client share
the machine, so read the differences, not the absolute figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import BENCH_KEY, BENCH_KEYS_TOML, free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "Qwen3-32B", "messages": [{"role": "user", "content": "hi"}]})
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}


def _post(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/v1/chat/completions", BODY, HEADERS)
    response = conn.getresponse()
    response.read()
    return response.status


def median_us(router_args: list[str], requests: int) -> float:
    """The median latency, in microseconds, through a router started with these args."""
    backend_port, port = free_port(), free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        for argv in (
            ["-m", "lmproxy.mock", "--port", str(backend_port)],
            ["-m", "lmproxy", "--host", "127.0.0.1", "--port", str(port), "--log-level",
             "warning", "--backend", f"http://127.0.0.1:{backend_port}", *router_args],
        ):  # fmt: skip
            started.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if _post(http.client.HTTPConnection("127.0.0.1", port, timeout=5)) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the router {router_args} did not answer 200 within 30 s")
            time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(requests // 5):  # warm-up
            _post(conn)
        times = []
        for _ in range(requests):
            begun = time.perf_counter()
            status = _post(conn)
            times.append(time.perf_counter() - begun)
            if status != 200:
                raise SystemExit(f"status {status} through {router_args}")
        return statistics.median(times) * 1e6
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as tmp:
        config = Path(tmp) / "keys.toml"
        config.write_text(BENCH_KEYS_TOML)
        settings: list[tuple[str, list[str]]] = [
            ("one process", []),
            ("--workers 2", ["--workers", "2"]),
        ]
        redis: subprocess.Popen[bytes] | None = None
        binary = shutil.which("redis-server")
        if binary is not None:
            redis_port = free_port()
            redis = subprocess.Popen(
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
                stdout=subprocess.DEVNULL,
            )
            settings.append(("--redis-url", ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]))
        else:
            print("skip --redis-url: redis-server is not installed")
        try:
            print("| setting | without keys | with a limited key | added |")
            print("| --- | ---: | ---: | ---: |")
            for name, extra in settings:
                # Redis serves keyed routers only (--redis-url needs [[keys]]).
                open_args = [] if name == "--redis-url" else extra
                plain = median_us(open_args, args.requests)
                keyed = median_us(["--config", str(config), *extra], args.requests)
                print(f"| {name} | {plain:.0f} us | {keyed:.0f} us | {keyed - plain:+.0f} us |")
        finally:
            if redis is not None:
                redis.kill()
                redis.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
