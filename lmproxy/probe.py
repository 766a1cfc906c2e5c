"""A small one-shot HTTP/1.1 GET client for health checks and model discovery.

Probes are rare and must be strict about what counts as an answer, so they use
h11's pure-Python state machine on a fresh connection each time: a probe then
never shares fate with the request pool, and a half-broken backend cannot fool
it with bytes the pool's fast path would accept.

An answer is bounded in bytes (``MAX_PROBE_BODY``) and in pieces
(``MAX_PROBE_PIECES``: h11 costs a few microseconds per chunk, so a body of
one-byte chunks would be seconds of Python), and the event loop gets a turn
every ``PIECES_PER_TURN`` pieces: one read of tiny chunks cannot hold it. A
caller that reads the body as it comes (the load scrape) passes a ``sink``,
which then gets each piece and may raise to stop reading.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Callable
from typing import Protocol

import h11

from lmproxy.tls import tls_reason

MAX_PROBE_BODY = 4 * 1024 * 1024  # a /v1/models listing is far smaller
MAX_PROBE_PIECES = 16384  # body pieces (chunks, reads) per answer: 256 bytes each on average
PIECES_PER_TURN = 64  # a few hundred microseconds of h11 between turns of the loop


class ProbeError(Exception):
    pass


class Probed(Protocol):
    """A service as a probe reaches it (``registry.Service``)."""

    host: str
    port: int
    ssl: _ssl.SSLContext | None
    server_name: str


async def probe(
    service: Probed,
    path: str,
    timeout_s: float,
    via: str,
    sink: Callable[[bytes], None] | None = None,
) -> tuple[int, bytes]:
    """GET ``path`` from ``service``, over TLS as its requests go; with ``sink``, the
    body goes to it piece by piece (and the returned body is empty)."""
    return await http_get(
        service.host, service.port, path, timeout_s, via, service.ssl, service.server_name, sink
    )


async def http_get(
    host: str,
    port: int,
    path: str,
    timeout_s: float,
    via: str = "",
    ssl: _ssl.SSLContext | None = None,
    server_name: str | None = None,
    sink: Callable[[bytes], None] | None = None,
) -> tuple[int, bytes]:
    """GET ``path``; return (status, body). Raises ProbeError or TimeoutError.

    ``via`` names the router: a probe that reaches the router itself is then
    answered 508 (a service configured at the router's own address). ``ssl``: over
    TLS, checked as the service's requests are, against ``server_name`` (default:
    ``host``).
    """
    async with asyncio.timeout(timeout_s):
        try:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl, server_hostname=(server_name or host) if ssl else None
            )
        except _ssl.SSLError as exc:
            raise ProbeError(f"TLS handshake failed: {tls_reason(exc)}") from None
        except OSError as exc:
            raise ProbeError(f"cannot connect: {exc.strerror or exc}") from None
        try:
            return await _exchange(reader, writer, host, port, path, via, sink)
        finally:
            writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
    path: str,
    via: str,
    sink: Callable[[bytes], None] | None,
) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", f"{host}:{port}"),
        ("User-Agent", "lmproxy-health"),
        ("Connection", "close"),
    ]
    if via:
        headers.append(("Via", f"1.1 {via}"))
    request = h11.Request(method="GET", target=path, headers=headers)
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    status = 0
    body = bytearray()
    size = pieces = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProbeError(f"broken HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                data = await reader.read(65536)
            except _ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows here
                raise ProbeError(f"TLS failed: {tls_reason(exc)}") from None
            except OSError as exc:
                raise ProbeError(f"connection failed: {exc.strerror or exc}") from None
            if not data and status == 0 and writer.get_extra_info("ssl_object") is not None:
                # TLS 1.3 servers refuse a missing client certificate after the handshake,
                # with an alert the event loop reports as a plain close.
                raise ProbeError(
                    "the service closed the TLS connection without answering; if it "
                    "requires a client certificate, give cert= and key= (or "
                    "--backend-certfile and --backend-keyfile)"
                )
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            pieces += 1
            if size > MAX_PROBE_BODY:
                raise ProbeError(f"response body over {MAX_PROBE_BODY // 1024 // 1024} MiB")
            if pieces > MAX_PROBE_PIECES:
                raise ProbeError(f"response body in over {MAX_PROBE_PIECES} pieces")
            if sink is None:
                body += event.data
            else:
                sink(event.data)
            if pieces % PIECES_PER_TURN == 0:
                await asyncio.sleep(0)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if not status:
                raise ProbeError("connection closed before a response")
            return status, bytes(body)
