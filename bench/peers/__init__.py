"""The proxies the benchmark compares, each started in front of the same simulated backends.

A peer that is not installed is skipped with a one-line reason. None of them is
a dependency of lmproxy: ``bench/setup.sh`` installs them (Debian's nginx and
wrk; vllm-router, sglang-router and litellm into a virtual environment of their
own, ``bench/.peers``).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS_VENV = Path(os.environ.get("LMPROXY_PEERS_VENV", ROOT / "bench" / ".peers"))
# The API key every benchmark request carries, and the [[keys]] entry that gives it
# rpm, tpm and max_in_flight limits, each far above what a run sends: every request
# pays for its checks, none is refused (lmproxy-keys, bench.keys, bench.hotpath --keys).
BENCH_KEY = "bench-key"
BENCH_KEYS_TOML = (
    f'[[keys]]\nname = "bench"\nkey = "{BENCH_KEY}"\n'
    "rpm = 1000000000\ntpm = 1000000000000\nmax_in_flight = 1000000\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


class Running:
    """A started peer: where to send requests, and how to measure its process tree."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen | None, workdir: str) -> None:
        self.name = name
        self.port = port
        self.proc = proc
        self.workdir = workdir
        self.scheme = "http"  # "https": serving TLS (the tls workload)

    def cpu_s(self) -> float:
        if self.proc is None:
            return 0.0
        total = 0
        for pid in process_tree(self.proc.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        if self.proc is None:
            return 0
        total = 0
        for pid in process_tree(self.proc.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total

    @property
    def log(self) -> str:
        path = Path(self.workdir) / "peer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_ready(
    port: int, proc: subprocess.Popen, workdir: str, timeout_s: float = 60, scheme: str = "http"
) -> None:
    """Until a chat completion goes through (routers discover their workers first)."""
    body = b'{"model":"Qwen3-32B","messages":[{"role":"user","content":"ready?"}],"max_tokens":1}'
    # The benchmark's own certificate: whether it is trusted is not what is measured.
    context = ssl._create_unverified_context() if scheme == "https" else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            req = urllib.request.Request(
                f"{scheme}://127.0.0.1:{port}/v1/chat/completions",
                data=body,
                # The benchmark's key, as every request of the load carries (bench/load.py).
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {BENCH_KEY}",
                },
            )
            with urllib.request.urlopen(req, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    log = (Path(workdir) / "peer.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"peer on port {port} did not become ready:\n{log}")


def _launch(
    name: str,
    argv: list[str],
    cpus: str | None,
    port: int,
    workdir: str,
    cwd: str | None = None,
    scheme: str = "http",
) -> Running:
    log = open(Path(workdir) / "peer.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, *argv] if cpus else argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd or workdir,
    )
    running = Running(name, port, proc, workdir)
    running.scheme = scheme
    try:
        _wait_ready(port, proc, workdir, scheme=scheme)
    except RuntimeError:
        running.stop()
        raise
    return running


class Peer:
    name = ""
    about = ""
    serves_tls = False  # can be started with tls=(certificate file, key file)

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    def start(self, backends: list[int], cpus: str) -> Running:
        raise NotImplementedError

    def start_tls(self, backends: list[int], cpus: str, tls: tuple[str, str]) -> Running:
        raise NotImplementedError


class Direct(Peer):
    name = "direct"
    about = "no proxy: the client talks to the backend (the floor)"

    def start(self, backends: list[int], cpus: str) -> Running:
        return Running(self.name, backends[0], None, tempfile.mkdtemp(prefix="bench-direct-"))


class Nginx(Peer):
    name = "nginx"
    about = "nginx reverse proxy, upstream keep-alive, no buffering (the C reference)"
    serves_tls = True

    def missing(self) -> str | None:
        return None if shutil.which("nginx") else "nginx is not installed (bench/setup.sh)"

    def start_tls(self, backends: list[int], cpus: str, tls: tuple[str, str]) -> Running:
        return self.start(backends, cpus, tls)

    def start(self, backends: list[int], cpus: str, tls: tuple[str, str] | None = None) -> Running:
        workdir = tempfile.mkdtemp(prefix="bench-nginx-")
        port = free_port()
        servers = "\n".join(f"server 127.0.0.1:{p};" for p in backends)
        conf = textwrap.dedent(f"""
            worker_processes 1;
            worker_rlimit_nofile 65536;
            error_log {workdir}/error.log warn;
            pid {workdir}/nginx.pid;
            events {{ worker_connections 32768; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                fastcgi_temp_path {workdir}/fastcgi;
                uwsgi_temp_path {workdir}/uwsgi;
                scgi_temp_path {workdir}/scgi;
                client_max_body_size 0;
                client_body_buffer_size 2m;
                keepalive_requests 1000000;
                upstream backends {{ {servers} keepalive 256; keepalive_requests 1000000; }}
                server {{
                    listen 127.0.0.1:{port} backlog=4096{" ssl" if tls else ""};
                    {f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""}
                    location / {{
                        proxy_pass http://backends;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_buffering off;
                        proxy_request_buffering on;
                        proxy_read_timeout 300s;
                    }}
                }}
            }}
        """)
        (Path(workdir) / "nginx.conf").write_text(conf)
        return _launch(
            self.name,
            ["nginx", "-c", f"{workdir}/nginx.conf", "-p", workdir, "-g", "daemon off;"],
            cpus,
            port,
            workdir,
            scheme="https" if tls else "http",
        )


class _VenvPeer(Peer):
    executable = ""

    def binary(self) -> Path:
        return PEERS_VENV / "bin" / self.executable

    def missing(self) -> str | None:
        if not self.binary().exists():
            return f"{self.executable} is not installed in {PEERS_VENV} (bench/setup.sh)"
        return None


class RustRouter(_VenvPeer):
    """vllm-router and sglang-router share their command line (sglang-router's is a
    fork of it), but for a subcommand and the spelling of the warning log level."""

    subcommand: tuple[str, ...] = ()
    warn_level = "warning"
    policies: tuple[str, ...] = ()  # those bench.routing compares

    def start(self, backends: list[int], cpus: str | None, policy: str = "round_robin") -> Running:
        workdir = tempfile.mkdtemp(prefix=f"bench-{self.name}-")
        port = free_port()
        argv = [
            str(self.binary()),
            *self.subcommand,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *[f"http://127.0.0.1:{p}" for p in backends],
            "--policy",
            policy,
            # No admission limits of their own: the benchmark measures the proxying.
            "--max-concurrent-requests",
            "100000",
            "--queue-size",
            "100000",
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            self.warn_level,
        ]
        return _launch(self.name, argv, cpus, port, workdir)


class VllmRouter(RustRouter):
    name = "vllm-router"
    about = "vllm-router (Rust), round_robin"
    executable = "vllm-router"
    policies = ("cache_aware", "consistent_hash", "round_robin")


class SglangRouter(RustRouter):
    name = "sglang-router"
    about = "sglang-router (Rust), round_robin"
    executable = "sglang-router"
    subcommand = ("launch",)
    warn_level = "warn"
    policies = ("cache_aware", "round_robin")


class Litellm(_VenvPeer):
    name = "litellm"
    about = "LiteLLM proxy, one worker"
    executable = "litellm"

    def start(self, backends: list[int], cpus: str) -> Running:
        workdir = tempfile.mkdtemp(prefix="bench-litellm-")
        port = free_port()
        entries = "".join(
            f"""
  - model_name: Qwen3-32B
    litellm_params:
      model: openai/Qwen3-32B
      api_base: http://127.0.0.1:{p}/v1
      api_key: none
"""
            for p in backends
        )
        (Path(workdir) / "config.yaml").write_text(
            f"model_list:{entries}\nlitellm_settings:\n  drop_params: true\n"
            # Loopback-only benchmark: no key, like every other peer here.
            "general_settings:\n  dangerously_permit_weak_or_unset_master_key: true\n"
        )
        argv = [
            str(self.binary()),
            "--config",
            f"{workdir}/config.yaml",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        return _launch(self.name, argv, cpus, port, workdir)


class AiohttpProxy(Peer):
    name = "aiohttp"
    about = "an aiohttp proxy (aiohttp server and client), like the InfiniLM-SVC router"

    def missing(self) -> str | None:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            return "aiohttp is not installed (pip install aiohttp, or bench/setup.sh)"
        return None

    def start(self, backends: list[int], cpus: str) -> Running:
        workdir = tempfile.mkdtemp(prefix="bench-aiohttp-")
        port = free_port()
        argv = [sys.executable, "-m", "bench.peers.aiohttp_proxy", "--port", str(port)]
        for p in backends:
            argv += ["--backend", f"http://127.0.0.1:{p}"]
        return _launch(self.name, argv, cpus, port, workdir, cwd=str(ROOT))


class Lmproxy(Peer):
    name = "lmproxy"
    about = "lmproxy, one process, default strategy (cache-aware)"
    serves_tls = True

    def start_tls(self, backends: list[int], cpus: str, tls: tuple[str, str]) -> Running:
        return self.start(backends, cpus, tls)

    def argv_extra(self, workdir: str) -> list[str]:
        return []

    def start(self, backends: list[int], cpus: str, tls: tuple[str, str] | None = None) -> Running:
        workdir = tempfile.mkdtemp(prefix="bench-lmproxy-")
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "lmproxy",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            # The load comes from 127.0.0.1 alone: no share per address, as behind a
            # load balancer (capped at --max-connections).
            "--max-connections-per-ip",
            "1000000",
        ]
        for i, p in enumerate(backends):
            argv += ["--backend", f"b{i}=http://127.0.0.1:{p},model=Qwen3-32B"]
        if tls:
            argv += ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]]
        argv += self.argv_extra(workdir)
        scheme = "https" if tls else "http"
        return _launch(self.name, argv, cpus, port, workdir, cwd=str(ROOT), scheme=scheme)


class LmproxyKeys(Lmproxy):
    """lmproxy with a [[keys]] key that has every limit, each far above what a run
    sends: every request pays for its checks, none is refused."""

    name = "lmproxy-keys"
    about = "lmproxy with an API key limited in rpm, tpm and max_in_flight ([[keys]])"
    serves_tls = False

    def argv_extra(self, workdir: str) -> list[str]:
        config = Path(workdir) / "keys.toml"
        config.write_text(BENCH_KEYS_TOML)
        return ["--config", str(config)]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Direct(),
        Nginx(),
        VllmRouter(),
        SglangRouter(),
        Litellm(),
        AiohttpProxy(),
        Lmproxy(),
        LmproxyKeys(),
    )
}
