"""The report of a ``python -m bench`` run: RESULTS.md and its charts, from the figures.

``bench/__main__.py`` measures and hands over a dict of figures per peer (also
written as JSON with ``--figures``); everything about presenting them is here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.peers import PEERS_VENV


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace, rate: float) -> str:
    """RESULTS.md from the figures of one run."""
    rows = list(results.values())
    direct = results.get("direct", {})
    nginx = results.get("nginx", {})
    lines = [
        "# lmproxy and its peers, side by side",
        "",
        f"Produced by `python -m bench {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Regenerate with the same command.",
        "",
        _machine(),
        "",
        "The proxy under test runs pinned to core 0, the load generator (wrk, or the "
        "asyncio client for stream timing) and two simulated backends "
        "(`python -m lmproxy.mock`) on core 1, for every peer. `x direct` and `x nginx` "
        "are ratios to those peers in this same run. CPU is the user + system time of "
        "the proxy's whole process tree from /proc, divided by what it served.",
        "",
    ]
    if any("small_rps" in r for r in rows):
        rate = rate
        lines += [
            "## 1. Small chat completions (16 tokens, not streamed)",
            "",
            f"Throughput at {args.concurrency} connections: the mean of two "
            f"{args.duration:g} s runs, one with the peers in each order, so that "
            "the shared machine's drift over the run weighs on every peer alike; "
            "latency and CPU at a fixed rate of about "
            f"{rate:.0f} req/s (half of lmproxy's peak; `at rate` is what each peer "
            "reached: wrk waits between a connection's requests, a random 0-2x the mean "
            "so that arrivals spread out instead of coming in bursts), 64 connections.",
            "",
            "| peer | req/s | x direct | x nginx | at rate | p50 at rate | p99 at rate | "
            "added p50 | added p99 | CPU per request | x nginx |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {fmt(r.get('small_rps'))} | "
                f"{_ratio(r.get('small_rps'), direct.get('small_rps'))} | "
                f"{_ratio(r.get('small_rps'), nginx.get('small_rps'))} | "
                f"{fmt(r.get('rate_rps'))} | "
                f"{_us(r.get('rate_p50_s'))} | {_us(r.get('rate_p99_s'))} | "
                f"{_us(_minus(r.get('rate_p50_s'), direct.get('rate_p50_s')))} | "
                f"{_us(_minus(r.get('rate_p99_s'), direct.get('rate_p99_s')))} | "
                f"{fmt(r.get('rate_cpu_us'), 1)} us | "
                f"{_ratio(r.get('rate_cpu_us'), nginx.get('rate_cpu_us'))} |"
            )
        lines.append("")
    if any("stream64_ttft_s" in r for r in rows):
        lines += [
            "## 2. Streamed answers",
            "",
            "Events/s and CPU per event with 16 concurrent streams and no delay between "
            "tokens. Time to first token (median) and the gaps between consecutive events "
            "(p50, p99) with 4 concurrent streams whose backend sends a token every 2 ms: "
            "a proxy that relays each event as it comes keeps the gaps near 2 ms; one that "
            "buffers shows gaps near 0 and far above 2 ms.",
            "",
            "| peer | tokens | events/s | x direct | CPU per event | x nginx | TTFT | "
            "TTFT added | event gap p50 | event gap p99 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for tokens in (64, 512):
            key = f"stream{tokens}"
            for r in rows:
                ttft_added = _minus(r.get(f"{key}_ttft_s"), direct.get(f"{key}_ttft_s"))
                lines.append(
                    f"| {r['name']} | {tokens} | {fmt(r.get(f'{key}_eps'))} | "
                    f"{_ratio(r.get(f'{key}_eps'), direct.get(f'{key}_eps'))} | "
                    f"{fmt(r.get(f'{key}_cpu_us'), 2)} us | "
                    f"{_ratio(r.get(f'{key}_cpu_us'), nginx.get(f'{key}_cpu_us'))} | "
                    f"{_us(r.get(f'{key}_ttft_s'))} | {_us(ttft_added)} | "
                    f"{_us(r.get(f'{key}_gap_p50_s'))} | {_us(r.get(f'{key}_gap_p99_s'))} |"
                )
        lines.append("")
    many_keys = [f"many{c}" for c in args.streams]
    limit_note = (
        "A proxy needs two descriptors per stream (client and backend); this machine's "
        f"hard open-file limit ({resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}) is the "
        "ceiling, and lmproxy refuses (503) past `--max-connections`, derived from it, "
        "rather than fail at random."
    )
    if any(k in r for r in rows for k in many_keys):
        lines += [
            "## 3. Many concurrent slow streams",
            "",
            "All streams opened at once (8 tokens, 0.6 s apart); memory is the proxy's "
            "resident set once all are open, less its resident set before. " + limit_note,
            "",
            "| peer | streams | completed | failed | proxy RSS | per stream |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key in many_keys:
            for r in rows:
                if key not in r:
                    continue
                m = r[key]
                if m is None:
                    lines.append(f"| {r['name']} | {key[4:]} | not run (minutes per run) | | | |")
                    continue
                lines.append(
                    f"| {r['name']} | {key[4:]} | {m['ok']} | {m['failed']} | "
                    f"{fmt(m['rss_mib'], 1)} MiB | {fmt(m['kib_per_stream'], 1)} KiB |"
                )
        lines.append("")
    if any("large100000_rps" in r for r in rows):
        lines += [
            "## 4. Large prompts",
            "",
            "8 connections, 1 token answers.",
            "",
            "| peer | prompt | req/s | x direct | CPU per request | x nginx |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for size in (100_000, 1_000_000):
            key = f"large{size}"
            for r in rows:
                lines.append(
                    f"| {r['name']} | {size // 1000} KB | {fmt(r.get(key + '_rps'))} | "
                    f"{_ratio(r.get(key + '_rps'), direct.get(key + '_rps'))} | "
                    f"{fmt(r.get(key + '_cpu_us'))} us | "
                    f"{_ratio(r.get(key + '_cpu_us'), nginx.get(key + '_cpu_us'))} |"
                )
        lines.append("")
    tls_rows = [r for r in rows if "tls_rps" in r]
    if tls_rows:
        lines += [
            "## 5. HTTPS",
            "",
            "Small chat completions over TLS (the same certificate for every peer, made at "
            f"run time): throughput at {args.concurrency} connections, and CPU per request at "
            "the fixed rate of section 1. `x plain` is the CPU per request over HTTPS "
            "against the same peer's over plain HTTP (section 1).",
            "",
            "| peer | req/s | x nginx | CPU per request | x nginx | x plain |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in tls_rows:
            lines.append(
                f"| {r['name']} | {fmt(r.get('tls_rps'))} | "
                f"{_ratio(r.get('tls_rps'), nginx.get('tls_rps'))} | "
                f"{fmt(r.get('tls_cpu_us'), 1)} us | "
                f"{_ratio(r.get('tls_cpu_us'), nginx.get('tls_cpu_us'))} | "
                f"{_ratio(r.get('tls_cpu_us'), r.get('rate_cpu_us'))} |"
            )
        lines.append("")
    errors = {
        r["name"]: sum(
            v for k, v in r.items() if k.endswith(("_errors", "_failed")) and isinstance(v, int)
        )
        for r in rows
    }
    if any(errors.values()):
        lines += [
            "Errors seen (non-2xx, socket errors, failed streams): "
            + ", ".join(f"{k} {v}" for k, v in errors.items() if v),
            "",
        ]
    return "\n".join(lines)


def charts(results: dict[str, dict[str, Any]], folder: Path) -> None:
    """The results-*.png charts beside RESULTS.md (matplotlib, when installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("skip charts: matplotlib is not installed (pip install matplotlib)")
        return
    rows = [r for r in results.values()]
    names = [r["name"] for r in rows]
    charts = [
        ("throughput", "requests/s (small chat, higher is better)", "small_rps", 1),
        ("latency", "microseconds at half lmproxy's peak (lower is better)", None, 1),
        ("cpu", "CPU microseconds per request (lower is better)", "rate_cpu_us", 1),
    ]
    for slug, label, key, scale in charts:
        fig, ax = plt.subplots(figsize=(8, 4))
        if key is None:
            width = 0.4
            xs = range(len(rows))
            ax.bar(
                [x - width / 2 for x in xs],
                [(r.get("rate_p50_s") or 0) * 1e6 for r in rows],
                width,
                label="p50",
            )
            ax.bar(
                [x + width / 2 for x in xs],
                [(r.get("rate_p99_s") or 0) * 1e6 for r in rows],
                width,
                label="p99",
            )
            ax.set_yscale("log")
            ax.legend()
        else:
            values = [(r.get(key) or 0) * scale for r in rows]
            values = [0 if isinstance(v, float) and math.isnan(v) else v for v in values]
            bars = ax.bar(names, values, color="tab:blue")
            # The peers differ a thousandfold (LiteLLM): a linear axis hides the rest.
            ax.set_yscale("log")
            ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
        ax.set_ylabel(label)
        fig.tight_layout()
        fig.savefig(folder / f"results-{slug}.png", dpi=100)
        plt.close(fig)


# --- formatting helpers ------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _minus(a: float | None, b: float | None) -> float:
    return (a - b) if a is not None and b is not None else math.nan


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _us(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1e6:,.0f} us"


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference or math.isnan(value) or math.isnan(reference):
        return "n/a"
    return f"{value / reference:.2f}"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pip = PEERS_VENV / "bin" / "pip"
    peer_versions = "peers' virtualenv not installed"
    if pip.exists():
        listed = subprocess.run(
            [str(pip), "list", "--format", "json"], capture_output=True, text=True, timeout=60
        ).stdout
        wanted = {"vllm-router", "sglang-router", "litellm", "aiohttp"}
        try:
            found = {p["name"].lower(): p["version"] for p in json.loads(listed)}
        except ValueError:
            found = {}
        peer_versions = ", ".join(f"{n} {found[n]}" for n in sorted(wanted) if n in found)
    from lmproxy import __version__

    return (
        f"Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}. Versions: lmproxy {__version__}; "
        f"{_version(['nginx', '-v']) if shutil.which('nginx') else 'nginx not installed'}; "
        f"{_version(['wrk', '-v']) if shutil.which('wrk') else 'wrk not installed'}; "
        f"{peer_versions}."
    )
