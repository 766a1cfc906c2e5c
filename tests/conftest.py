"""Fixtures that start real processes on loopback: simulated backends and the router.

Every process gets an ephemeral port (``--port 0``) and reports it on its first
line of output; every wait polls with a deadline; every process is killed at
the end of its test.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 20.0
_PORT_LINE = re.compile(rb"listening on https?://[^:\s]+:(\d+)")


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.02)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
    context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTP request on a fresh connection; ``body`` may be bytes or JSON-able.
    With ``context``, over TLS."""
    conn = (
        http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        if context is not None
        else http.client.HTTPConnection(host, port, timeout=timeout)
    )
    try:
        payload = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if payload is not None else {}
        all_headers.update(headers or {})
        conn.request(method, path, body=payload, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def chat_body(model: str | None = "Qwen3-32B", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello"}], **extra}
    if model is not None:
        body["model"] = model
    return body


class Process:
    """A real child process whose output goes to a file we can read at any time."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, nofile: int | None = None
    ) -> None:
        # Closed in stop(): the file outlives this constructor on purpose.
        self.log_file = tempfile.NamedTemporaryFile(prefix="lmproxy-test-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            # An open-file limit (soft and hard, as `ulimit -n N` sets it) the process
            # cannot raise.
            preexec_fn=(lambda: _limit_open_files(nofile)) if nofile else None,
        )
        self.port = 0

    @property
    def output(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_for_port(self) -> int:
        def found() -> int | None:
            match = _PORT_LINE.search(Path(self.log_file.name).read_bytes())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode}:\n{self.output}")
            return None

        self.port = wait_until(found, STARTUP_TIMEOUT_S, "the process to listen")
        return self.port

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


def _limit_open_files(count: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


class Mock(Process):
    """A simulated backend: ``python -m lmproxy.mock``."""

    def __init__(self, name: str, models: list[str], *extra: str, port: int = 0) -> None:
        args = ["-m", "lmproxy.mock", "--port", str(port), "--name", name]
        for model in models:
            args += ["--model", model]
        super().__init__([*args, *extra])
        self.name = name
        self.models = models
        self.scheme = "https" if "--ssl-certfile" in extra else "http"
        self.host = extra[extra.index("--host") + 1] if "--host" in extra else "127.0.0.1"
        self.context: ssl.SSLContext | None = None  # for stats() and the like over TLS
        self.wait_for_port()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def backend_arg(self, *options: str) -> str:
        return ",".join([f"{self.name}={self.url}", *options])

    def stats(self) -> dict[str, Any]:
        return request(self.port, "GET", "/mock/stats", host=self.host, context=self.context).json()

    def set_timing(self, **settings: float) -> None:
        assert request(self.port, "POST", "/mock/settings", settings, host=self.host).status == 200

    def set_fault(self, fault: str) -> None:
        assert (
            request(self.port, "POST", "/mock/fault", {"fault": fault}, host=self.host).status
            == 200
        )


class Router(Process):
    """The router under test: ``python -m lmproxy`` on 127.0.0.1."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
        nofile: int | None = None,
    ) -> None:
        super().__init__(
            ["-m", "lmproxy", "--host", "127.0.0.1", "--port", "0", *args], env, nofile
        )
        self.context = context  # an HTTPS router: the client side's TLS
        self.wait_for_port()

    def get(self, path: str, **kw: Any) -> Response:
        return request(self.port, "GET", path, context=self.context, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return request(self.port, "POST", path, body, context=self.context, **kw)

    def wait_healthy(self, count: int, timeout_s: float = 10.0) -> None:
        def ready() -> bool:
            health = self.get("/health").json()
            return health["healthy_services"].split("/")[0] == str(count)

        wait_until(ready, timeout_s, f"{count} healthy services")

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until nothing is in flight and nothing queued: every slot came back."""

        def idle() -> bool:
            stats = self.get("/stats").json()
            return stats["queue_length"] == 0 and all(
                s["in_flight"] == 0 for s in stats["services"]
            )

        wait_until(idle, timeout_s, "in_flight and queue_length back to 0")

    def listed(self) -> dict[str, dict[str, Any]]:
        """GET /services, by name."""
        return {s["name"]: s for s in self.get("/services").json()["services"]}

    def stats_of(self, name: str) -> dict[str, Any]:
        for service in self.get("/stats").json()["services"]:
            if service["name"] == name:
                return service
        raise KeyError(name)


class Registry(Process):
    """The InfiniLM-SVC registry stand-in: ``tests/infinilm_registry.py``."""

    def __init__(self, *extra: str) -> None:
        super().__init__(["tests/infinilm_registry.py", "--port", "0", *extra])
        self.context: ssl.SSLContext | None = None  # serving HTTPS: what reaches it
        self.wait_for_port()

    def register(self, name: str, backend: Mock, kind: str = "openai-api", **extra: object) -> None:
        entry = {
            "name": name,
            "host": "127.0.0.1",
            "port": backend.port,
            "hostname": "localhost",
            "url": backend.url,
            "status": "running",
            "metadata": {"type": kind, "models": backend.models},
            **extra,
        }
        assert request(self.port, "POST", "/services", entry, context=self.context).status == 201

    def delete(self, name: str) -> None:
        assert request(self.port, "DELETE", f"/services/{name}").status == 200


def router_over(
    spawn: Callable[..., Any],
    backends: list[Mock],
    *options: str,
    env: dict[str, str] | None = None,
) -> Router:
    """A router in front of ``backends`` (one ``--backend`` each), once all are healthy."""
    args = [arg for backend in backends for arg in ("--backend", backend.backend_arg())]
    router = spawn(Router, *args, *options, env=env)
    router.wait_healthy(len(backends))
    return router


# Fixtures that start processes: spawn, the module-wide processes (module_spawn and
# what it starts), and the module-wide router and backend of the attack and fuzz
# modules (started once per module, without spawn).
PROCESS_FIXTURES = frozenset(
    {"spawn", "module_spawn", "router", "backend", "lenient_router", "shared_router"}
)
SLOW_MODULES = frozenset({"test_bench"})  # benchmarks, run as processes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts processes: ``pytest -m "not slow"`` is the
    everyday run (in-process and unit tests, under a minute); CI runs everything."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        module = getattr(item, "module", None)
        if fixtures & PROCESS_FIXTURES or (module is not None and module.__name__ in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)


def _spawner() -> Iterator[Callable[..., Any]]:
    started: list[Process] = []

    def start(kind: type[Process], *args: Any, **kwargs: Any) -> Any:
        proc = kind(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Any]]:
    """Start processes (``spawn(Mock, ...)``, ``spawn(Router, ...)``); all stop at the end."""
    yield from _spawner()


@pytest.fixture(scope="module")
def module_spawn() -> Iterator[Callable[..., Any]]:
    """``spawn`` for processes a whole module shares: they stop after its last test."""
    yield from _spawner()


@pytest.fixture(scope="module")
def shared_backends(module_spawn: Callable[..., Any]) -> tuple[Mock, Mock]:
    """``two_backends``, started once per module: for tests that set no fault and
    count nothing absolute (each test asks about its own requests)."""
    return (
        module_spawn(Mock, "svc-qwen", ["Qwen3-32B"]),
        module_spawn(Mock, "svc-9g", ["9g_8b_thinking"]),
    )


@pytest.fixture(scope="module")
def shared_router(module_spawn: Callable[..., Any], shared_backends: tuple[Mock, Mock]) -> Router:
    """A router over ``shared_backends`` with default flags, shared by a module."""
    return router_over(module_spawn, list(shared_backends))


@pytest.fixture
def two_backends(spawn: Callable[..., Any]) -> tuple[Mock, Mock]:
    return (
        spawn(Mock, "svc-qwen", ["Qwen3-32B"]),
        spawn(Mock, "svc-9g", ["9g_8b_thinking"]),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
