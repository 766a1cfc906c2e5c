"""The in-process layer: a real Router driven through in-memory transports.

No socket and no other process: bytes go into a client connection's
``data_received``, what the router writes to a backend is read from that
backend connection's transport, the backend's answer goes into its
``data_received``, and what the client gets is read back. A case runs in
milliseconds, so parsing, pipelining, framing and relaying are tested here byte
by byte; ``bench/hotpath.py`` times the same harness.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lmproxy.app import Router
from lmproxy.backend.upstream import UpstreamConnection
from lmproxy.client.connection import ClientConnection
from lmproxy.config import Config, ServiceSpec
from lmproxy.fleet.roster import Service

MODEL = "Qwen3-32B"
BODY = b'{"model":"Qwen3-32B","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'


def chat_request(
    body: bytes = BODY,
    method: bytes = b"POST",
    path: bytes = b"/v1/chat/completions",
    extra: bytes = b"",
) -> bytes:
    return (
        b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (method, path, len(body), extra, body)
    )


class MemoryTransport:
    """Just enough of asyncio.Transport: writes are kept, reading can be paused."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.reading = True
        self.eof_written = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def take(self) -> bytes:
        """Everything written since the last take."""
        data = b"".join(self.written)
        self.written.clear()
        return data

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


def spec(name: str, n: int, **fields: Any) -> ServiceSpec:
    """Service ``name`` serving MODEL, on port 9 + ``n``, unless ``fields`` say
    otherwise (``models``, ``url``), with its other settings (``role``,
    ``bootstrap_port``, ``max_in_flight``)."""
    fields.setdefault("models", [MODEL])
    fields.setdefault("url", f"http://127.0.0.1:{9 + n}")
    return ServiceSpec(name=name, **fields)


class Harness:
    """One Router over one service ``a`` (healthy, serving MODEL), with no sockets;
    ``names``: more services of the model, in that order; ``specs``: the services
    instead, as given (several models, prefill/decode roles, limits).

    Construct it inside a running event loop (an ``async`` test).
    """

    def __init__(
        self,
        names: tuple[str, ...] = ("a",),
        specs: list[ServiceSpec] | None = None,
        **settings: Any,
    ) -> None:
        if specs is None:
            specs = [spec(name, n) for n, name in enumerate(names)]
        self.router = Router(Config(services=specs, **settings))
        self.service: Service = self.router.roster.services[specs[0].name]
        for service in self.router.roster.services.values():
            self.router.roster.probe_passed(service, None)

    def client(self) -> tuple[ClientConnection, MemoryTransport]:
        """A new client connection, as the listener would make it."""
        conn = ClientConnection(self.router)
        transport = MemoryTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    def backend(self, name: str | None = None) -> tuple[UpstreamConnection, MemoryTransport]:
        """A connection to the service (``name``'s), idle in its pool: the next request
        takes it."""
        service = self.service if name is None else self.router.roster.services[name]
        pool = service.pool
        assert pool is not None
        conn = UpstreamConnection(pool)
        transport = MemoryTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool.release(conn)
        return conn, transport

    @staticmethod
    async def turn(times: int = 3) -> None:
        """Let the loop run what the router scheduled (a journey's finish, a drain)."""
        for _ in range(times):
            await asyncio.sleep(0)

    def sweep(self) -> None:
        """Enforce the connections' deadlines once, as the router's sweep timer does
        (armed only by ``Router.start``, which the harness never calls)."""
        self.router._sweep()
        if self.router._sweeper is not None:
            self.router._sweeper.cancel()  # the sweep re-arms itself: not past this case

    def idle_backends(self) -> int:
        pool = self.service.pool
        assert pool is not None
        return len(pool._idle)
