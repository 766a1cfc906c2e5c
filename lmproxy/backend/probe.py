"""The router's one HTTP/1.1 client: a GET on a connection of its own, over h11.

Health checks, model discovery, the load scrape and the InfiniLM registry poll
(``probe``, ``http_get``) and the Kubernetes API (``kube.py``: a list, and a watch
whose body streams for minutes) all GET through ``open_get``. They are rare and
must be strict about what counts as an answer, so they use h11's pure-Python
state machine on a fresh connection each time: a GET then never shares fate with
the request pool, and a half-broken peer cannot fool it with bytes the pool's
fast path would accept. Redirects are never followed: a 3xx is an answer like
any other, which the caller refuses.

``open_get`` returns once the response's head is in (an ``Answer``); its body
then comes a piece per read however the peer chunks it, and the event loop gets
a turn every ``Caller.events_per_turn`` h11 events: one read of tiny chunks
cannot hold it. What differs between callers (the exception they raise and its
wording, how often they yield, their deadlines) is a ``Caller``.

A probe's answer is bounded in bytes (``MAX_PROBE_BODY``) and in chunks
(``MAX_PROBE_PIECES``: h11 costs a few microseconds per chunk, so a body of
one-byte chunks would be seconds of Python). A caller that reads the body as it
comes (the load scrape) passes a ``sink``, which then gets each piece and may
raise to stop reading.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, Protocol

import h11

from lmproxy.backend.tls import tls_reason

MAX_PROBE_BODY = 4 * 1024 * 1024  # a /v1/models listing is far smaller
MAX_PROBE_PIECES = 16384  # body chunks per answer: 256 bytes each on average
PIECES_PER_TURN = 64  # a few hundred microseconds of h11 between turns of the loop
READ_BYTES = 65536


class ProbeError(Exception):
    pass


class Peer(Protocol):
    """Where a GET goes: a service (``roster.Service``), or the Kubernetes API
    server (``kube.Access``)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def ssl(self) -> _ssl.SSLContext | None: ...

    @property
    def server_name(self) -> str | None:
        """The TLS name to check, when not the host."""


class Address(NamedTuple):
    host: str
    port: int
    ssl: _ssl.SSLContext | None = None
    server_name: str | None = None


class Caller(NamedTuple):
    """What one kind of caller's GETs raise, how each failure reads (``{}``: its
    cause), and how many h11 events run between turns of the loop."""

    error: Callable[[str], Exception]
    events_per_turn: int
    no_connection: str  # the connection not made in time ({}: the seconds)
    no_head: str  # the response's head not in in time ({}: the seconds)
    handshake: str
    connect: str
    not_http: str
    lost_tls: str
    lost: str
    no_answer: str  # closed before a response
    no_answer_tls: str  # the same over TLS, where a refused client certificate shows so
    cut: str  # closed before the body's end

    def fail(self, words: str, cause: object = "") -> Exception:
        return self.error(words.format(cause))


PROBE = Caller(
    ProbeError,
    PIECES_PER_TURN,
    no_connection="",  # a probe's one deadline is its caller's: TimeoutError
    no_head="",
    handshake="TLS handshake failed: {}",
    connect="cannot connect: {}",
    not_http="broken HTTP response: {}",
    lost_tls="TLS failed: {}",  # TLS 1.3: a refused client certificate shows here
    lost="connection failed: {}",
    no_answer="connection closed before a response",
    # TLS 1.3 servers refuse a missing client certificate after the handshake, with
    # an alert the event loop reports as a plain close.
    no_answer_tls=(
        "the service closed the TLS connection without answering; if it "
        "requires a client certificate, give cert= and key= (or "
        "--backend-certfile and --backend-keyfile)"
    ),
    cut="broken HTTP response: {}",
)


class Probed(Protocol):
    """A service as a probe reaches it (``roster.Service``)."""

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
    headers = [("User-Agent", "lmproxy-health"), ("Connection", "close")]
    if via:
        headers.append(("Via", f"1.1 {via}"))
    async with asyncio.timeout(timeout_s):
        answer = await open_get(Address(host, port, ssl, server_name), path, headers, PROBE)
        try:
            return answer.status, await _probe_body(answer, sink)
        finally:
            answer.close()


async def _probe_body(answer: Answer, sink: Callable[[bytes], None] | None) -> bytes:
    body = bytearray()
    size = 0
    async for piece in answer.pieces():
        size += len(piece)
        if size > MAX_PROBE_BODY:
            raise ProbeError(f"response body over {MAX_PROBE_BODY // 1024 // 1024} MiB")
        if answer.chunks > MAX_PROBE_PIECES:
            raise ProbeError(f"response body in over {MAX_PROBE_PIECES} pieces")
        if sink is None:
            body += piece
        else:
            sink(piece)
    return bytes(body)


async def open_get(
    peer: Peer,
    path: str,
    headers: list[tuple[str, str]],
    caller: Caller,
    timeout_s: float | None = None,
) -> Answer:
    """Send ``GET path`` on a new connection to ``peer`` and read the response's head.

    ``headers`` follow ``Host``. With ``timeout_s``, the connection and the head each
    have that long (the caller's own error if not); without, the caller's deadline
    covers the whole GET. The caller closes the answer."""
    tls_name = (peer.server_name or peer.host) if peer.ssl else None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                peer.host, peer.port, ssl=peer.ssl, server_hostname=tls_name
            )
    except TimeoutError:
        if timeout_s is None:
            raise
        raise caller.fail(caller.no_connection, f"{timeout_s:g}") from None
    except _ssl.SSLError as exc:
        raise caller.fail(caller.handshake, tls_reason(exc)) from None
    except OSError as exc:
        raise caller.fail(caller.connect, exc.strerror or exc) from None
    answer = Answer(reader, writer, caller)
    host = f"[{peer.host}]" if ":" in peer.host else peer.host
    headers = [("Host", f"{host}:{peer.port}"), *headers]
    answer.send(h11.Request(method="GET", target=path, headers=headers))
    try:
        async with asyncio.timeout(timeout_s):
            await answer.head()
    except TimeoutError:
        answer.close()
        if timeout_s is None:
            raise
        raise caller.fail(caller.no_head, f"{timeout_s:g}") from None
    except BaseException:
        answer.close()
        raise
    return answer


class Answer:
    """A response under way on a connection of its own: its status, then its body."""

    __slots__ = ("_caller", "_conn", "_events", "_reader", "_writer", "chunks", "status")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: Caller
    ) -> None:
        self.status = 0
        self.chunks = 0  # h11 Data events so far: what a body costs in Python
        self._conn = h11.Connection(h11.CLIENT)
        self._reader = reader
        self._writer = writer
        self._caller = caller
        self._events = self._follow()

    def send(self, request: h11.Request) -> None:
        conn = self._conn
        self._writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))

    def close(self) -> None:
        self._writer.close()

    async def head(self) -> None:
        """Read up to the response's head (interim 1xx answers are h11's to skip)."""
        async for event in self._events:
            if isinstance(event, h11.Response):
                self.status = event.status_code
                return
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        raise self._caller.fail(self._caller.no_answer)

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it comes, one piece per read however the peer chunks it (a
        chunk per byte is as many h11 events, not as many pieces for the reader)."""
        parts: list[bytes] = []
        async for event in self._events:
            if isinstance(event, h11.Data):
                self.chunks += 1
                parts.append(bytes(event.data))
            elif parts and (event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage)):
                yield b"".join(parts)
                parts.clear()

    async def _follow(self) -> AsyncIterator[Any]:
        """h11's events until the message ends, and NEED_DATA before each read."""
        turn = self._caller.events_per_turn
        handled = 0
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                yield event  # all that came is handled: pieces() hands on what it gathered
                self._conn.receive_data(await self._read())
                continue
            handled += 1
            if handled % turn == 0:
                # A read of what is already buffered returns without waiting: a body of
                # tiny chunks would hold the loop for as long as the peer keeps up, so
                # the router's other work gets a turn.
                await asyncio.sleep(0)
            yield event
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    def _next_event(self) -> Any:
        caller = self._caller
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            cut = self._conn.their_state is h11.SEND_BODY and self._reader.at_eof()
            raise caller.fail(caller.cut if cut else caller.not_http, exc) from None

    async def _read(self) -> bytes:
        caller = self._caller
        try:
            data = await self._reader.read(READ_BYTES)
        except _ssl.SSLError as exc:
            raise caller.fail(caller.lost_tls, tls_reason(exc)) from None
        except OSError as exc:
            raise caller.fail(caller.lost, exc.strerror or exc) from None
        if (
            not data
            and self._conn.their_state is h11.SEND_RESPONSE
            and self._writer.get_extra_info("ssl_object") is not None
        ):
            raise caller.fail(caller.no_answer_tls)
        return data
