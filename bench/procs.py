"""Starting the processes a benchmark measures: simulated backends and the router."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PORT_LINE = re.compile(rb"listening on https?://[^:\s]+:(\d+)")
ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A child process that reports its port on a 'listening on http://host:port' line."""

    def __init__(self, args: list[str], cpus: str | None = None, timeout_s: float = 20) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="lmproxy-bench-", suffix=".log")  # noqa: SIM115
        prefix = ["taskset", "-c", cpus] if cpus else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            match = _PORT_LINE.search(Path(self.log.name).read_bytes())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{args} did not start:\n{Path(self.log.name).read_text()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        """User + system CPU seconds so far, from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def mock(name: str, model: str = "Qwen3-32B", *extra: str, cpus: str | None = None) -> Proc:
    return Proc(
        ["-m", "lmproxy.mock", "--port", "0", "--name", name, "--model", model, *extra], cpus
    )


def router(*args: str, cpus: str | None = None) -> Proc:
    return Proc(["-m", "lmproxy", "--host", "127.0.0.1", "--port", "0", *args], cpus)
