"""The benchmark harness, in smoke mode, so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

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
            "direct,nginx,vllm-router,sglang-router,aiohttp,lmproxy",
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
    assert ours["many50"]["kib_per_stream"] > 0
    assert ours["stream64_ttft_s"] > 0 and ours["stream512_ttft_s"] > 0
    assert "direct" in figures
    if "skip request-rate figures" not in out:  # wrk is installed
        assert ours["small_rps"] > 0 and ours["small_errors"] == 0, ours
        assert ours["tls_rps"] > 0 and ours["tls_errors"] == 0, ours  # served over HTTPS
    for line in out.splitlines():
        if line.startswith("skip "):
            assert "not installed" in line, line  # skipped only for a stated reason
    assert "# lmproxy and its peers, side by side" in out  # the report came out too


def test_hotpath_bench_runs_and_every_request_completes():
    result = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--requests", "500", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "us of CPU per request" in result.stdout
