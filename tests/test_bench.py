"""The benchmark harness, in smoke mode, so that it cannot rot."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_bench_smoke_runs_every_installed_peer():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--workloads",
            "small,stream,many",
            "--peers",
            "direct,nginx,vllm-router,sglang-router,aiohttp,lmproxy",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "== lmproxy" in out and "== direct" in out
    assert "| lmproxy | 50 | 50 | 0 |" in out  # every stream of the many-streams run completed
    for line in out.splitlines():
        if line.startswith("skip "):
            assert "not installed" in line, line  # skipped only for a stated reason


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
