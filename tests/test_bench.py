"""The benchmark harness, in smoke mode, so that it cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT


def test_bench_smoke_runs_every_installed_peer(tmp_path):
    figures_path = tmp_path / "figures.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--workloads",
            "small,stream,many,tls",
            "--peers",
            "direct,nginx,vllm-router,sglang-router,aiohttp,lmproxy,lmproxy-keys",
            "--figures",
            str(figures_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    figures = json.loads(figures_path.read_text())
    ours = figures["lmproxy"]
    # Every stream of the many-streams run completed, and each workload measured something.
    assert (ours["many50"]["ok"], ours["many50"]["failed"]) == (50, 0), ours
    # Measured (a number, not NaN); 50 streams may fit in memory the process already had,
    # so the figure itself can be 0: only the full run's thousands of streams say much.
    assert math.isfinite(ours["many50"]["kib_per_stream"])
    assert ours["stream64_ttft_s"] > 0 and ours["stream512_ttft_s"] > 0
    assert "direct" in figures
    # With a limited [[keys]] key, every request carries the bench key and is admitted.
    keyed = figures["lmproxy-keys"]
    assert (keyed["many50"]["ok"], keyed["many50"]["failed"]) == (50, 0), keyed
    if "skip request-rate figures" not in out:  # wrk is installed
        assert ours["small_rps"] > 0 and ours["small_errors"] == 0, ours
        assert ours["tls_rps"] > 0 and ours["tls_errors"] == 0, ours  # served over HTTPS
    for line in out.splitlines():
        if line.startswith("skip "):
            assert "not installed" in line, line  # skipped only for a stated reason
    assert "# lmproxy and its peers, side by side" in out  # the report came out too


@pytest.mark.parametrize("keys", [[], ["--keys"]])
def test_hotpath_bench_runs_and_every_request_completes(keys):
    result = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--requests", "500", "--repeat", "1", *keys],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "us of CPU per request" in result.stdout


def test_pd_bench_runs_both_protocols(tmp_path):
    """bench.pd, briefly: lmproxy takes both steps of every request in both protocols
    (the simulated decode refuses anything else), beside whichever Rust router is
    installed."""
    figures = tmp_path / "pd.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.pd", "--duration", "1", "--rate", "50",
         "--streams", "5", "--output", "", "--figures", str(figures)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    rows = json.loads(figures.read_text())
    for mode in ("vllm", "sglang"):
        ours = next(r for r in rows[mode] if r["name"] == "lmproxy")
        assert ours["failed"] == 0 and ours["errors"] == 0 and ours["ttft_s"] > 0, ours
        assert rows[mode][0]["name"].startswith("direct")
    assert "# Prefill/decode disaggregation" in out


def test_keys_bench_runs_every_setting():
    """bench.keys, briefly: each setting is measured with and without a limited key (the
    keyed routers answer 200 to every request, or it stops)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.keys", "--requests", "50"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and " us |" in line
    ]
    assert [row.split(" | ")[0] for row in rows][:2] == ["| one process", "| --workers 2"]


def test_attacks_bench_runs_and_reports_both_phases():
    result = subprocess.run(
        [sys.executable, "-m", "bench.attacks", "--seconds", "1", "--connections", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.startswith(("/health", "chat"))]
    assert [row[0] for row in rows] == ["/health", "chat"], out
    assert "KiB per attacking connection" in out
