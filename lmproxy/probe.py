"""A small one-shot HTTP/1.1 GET client for health checks and model discovery.

Probes are rare and must be strict about what counts as an answer, so they use
h11's pure-Python state machine on a fresh connection each time: a probe then
never shares fate with the request pool, and a half-broken backend cannot fool
it with bytes the pool's fast path would accept.
"""

from __future__ import annotations

import asyncio

import h11

MAX_PROBE_BODY = 4 * 1024 * 1024  # a /v1/models listing is far smaller


class ProbeError(Exception):
    pass


async def http_get(
    host: str, port: int, path: str, timeout_s: float, via: str = ""
) -> tuple[int, bytes]:
    """GET ``path``; return (status, body). Raises ProbeError or TimeoutError.

    ``via`` names the router: a probe that reaches the router itself is then
    answered 508 (a service configured at the router's own address).
    """
    async with asyncio.timeout(timeout_s):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ProbeError(f"cannot connect: {exc.strerror or exc}") from None
        try:
            return await _exchange(reader, writer, host, port, path, via)
        finally:
            writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
    path: str,
    via: str,
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
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProbeError(f"broken HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                data = await reader.read(65536)
            except OSError as exc:
                raise ProbeError(f"connection failed: {exc.strerror or exc}") from None
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_PROBE_BODY:
                raise ProbeError("response body too large")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if not status:
                raise ProbeError("connection closed before a response")
            return status, bytes(body)
