"""The backend side: one connection's protocol, and the per-service connection pool.

A connection's lifecycle is a small explicit state (h11's lesson)::

    IDLE --send()--> BUSY --response complete, keep-alive--> IDLE
      |                |
      +---lost/expired-+--lost, broken, must-close, aborted--> CLOSED

Only IDLE connections sit in the pool; a CLOSED one is never handed out again.
An idle connection the backend closes is noticed by ``connection_lost`` while it
waits, so it leaves the pool before anyone picks it (httpcore's ``has_expired``
readability check, done by the event loop for free).

Responses are parsed by httptools with two callbacks only, the head's end and
the message's: the head goes to the sink as the bytes the backend sent (the
few headers the router acts on are found in them with one regular expression),
and there is no ``on_body``, so a streamed answer costs no Python call per
event. Each read's body bytes go to the request's :class:`Sink` as
they came (a chunked body keeps its chunk framing, which an HTTP/1.1 client
reads as is), and the sink is flushed once per read, so a read that carried
many SSE events is one write to the client. The parser still reads every byte:
it finds where the response ends and rejects a broken one. Only for an HTTP/1.0
client, which cannot read chunks, does a second parser hand over the pieces.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import ssl
from collections import deque
from typing import Protocol

import httptools

from lmproxy.backend.tls import tls_reason

# Framing of a response body as the backend sent it.
LENGTH, CHUNKED, UNTIL_CLOSE, NO_BODY = range(4)
MAX_HEAD_BYTES = 64 * 1024
HEAD_END = b"\r\n\r\n"  # llhttp accepts no bare LF line endings: a head ends here
CHUNKED_END = b"\r\n0\r\n\r\n"
# A backend connection's kernel receive buffer, fixed: left to autotuning it grows to
# tcp_rmem's maximum (32 MiB on common kernels) while the router reads fast, and then
# holds that much for a client that stopped reading before the backend feels any
# back-pressure. Tokens need no more than this (the kernel doubles it for bookkeeping).
RECEIVE_BUFFER = 256 * 1024
# The head's fields the relay needs, in one scan: its framing (llhttp has checked the
# values, and allows no space before the colon), its Connection header (the headers
# it names are hop-by-hop too), its Content-Type, and whether any other line is
# hop-by-hop (RFC 9110 7.6.1), so that a head with none is relayed without a rewrite.
_HEAD_FIELDS = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|content-type|keep-alive|"
    rb"proxy-authenticate|proxy-authorization|proxy-connection|te|trailer|upgrade)"
    rb":[ \t]*([^\r]*)",
    re.I,
)
# What UpstreamConnection.marks says of the last head.
EVENT_STREAM = 1  # Content-Type: text/event-stream
TRANSFER_ENCODING = 2  # a Transfer-Encoding line
HOP_LINES = 4  # another hop-by-hop line (Connection among them)


class _SecondResponse(Exception):
    """Raised from a parser callback: a response began after the one asked for ended."""


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    CLOSED = "closed"


class Sink(Protocol):
    """Receives one response from an upstream connection (the proxy's Exchange)."""

    def on_head(self, status: int, head: bytes, framing: int) -> None:
        """The response head as sent, from its status line to the blank line after
        its last header, with the framing of the body that follows."""
        ...

    def on_body(self, data: bytes) -> None:
        """Body bytes, once per read: as framed by the backend (chunks included), or
        de-chunked pieces when the connection was asked for ``pieces``."""
        ...

    def flush(self) -> None:
        """Called once after every read from the backend; write what was gathered."""
        ...

    def on_complete(self, reusable: bool) -> None:
        """The response ended; flush anything gathered, then finish."""
        ...

    def on_lost(self, reason: str, broken: bool) -> None:
        """The connection failed before the response completed.

        ``broken`` is True for a protocol error (garbage from the backend) and
        False for a plain close or reset.
        """
        ...

    def on_error(self, exc: Exception) -> None:
        """One of the sink's own methods (or this connection's code) raised while a
        read was handled: the connection is closed already, and it is not the
        backend's fault. The sink ends its request."""
        ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_done",
        "_framing",
        "_head",
        "_head_only",
        "_head_seen",
        "_informational",
        "_pieces_parser",
        "_probe_hit",
        "_probing",
        "_raw_parser",
        "_remaining",
        "_reusable",
        "_scan",
        "connection",
        "idle_since",
        "last_activity",
        "loop",
        "marks",
        "parser",
        "pool",
        "received_any",
        "reused",
        "sink",
        "state",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = self._raw_parser = httptools.HttpResponseParser(self)
        self._pieces_parser: httptools.HttpResponseParser | None = None
        self.state = State.IDLE
        self.sink: Sink | None = None
        self.reused = False
        self.received_any = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self._framing = UNTIL_CLOSE
        self._informational = False
        self._head_only = False
        self._head_seen = False
        self._head = b""  # this response's bytes until its head is complete
        self._scan = 0  # where in _head the next head's end is looked for (after a 1xx)
        self._body = b""  # the body bytes of the read being parsed
        self._remaining = -1  # body bytes still due, for a Content-Length body
        self._done = False  # the parser saw the response end
        self._reusable = False  # the response ended, and nothing came after it
        self._probing = False
        self._probe_hit = False
        self.connection: bytes | None = None  # the response's Connection header
        self.marks = 0  # EVENT_STREAM, TRANSFER_ENCODING, HOP_LINES: of the response's head

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.received_any = True
        sink = self.sink
        if sink is None:
            # Bytes from a backend nobody asked: it is broken; never reuse it.
            self.close()
            return
        try:  # free until something raises (CPython 3.11): no cost per read
            if self._head_seen:
                self._body = data
            else:
                self._head = self._head + data if self._head else data
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
            if self.sink is not sink:  # it ended in a callback (HEAD), or failed just above
                return
            if len(self._head) > MAX_HEAD_BYTES:  # still no end of the head
                self._fail(f"backend sent a response head over {MAX_HEAD_BYTES} bytes", broken=True)
                return
            body = self._body
            if body:
                self._body = b""
                if self._remaining >= 0:
                    self._remaining -= len(body)  # on_message_complete cut what follows
                if self.parser is self._raw_parser:
                    sink.on_body(body)
            if self._done:
                self._complete(self._reusable)
            else:
                sink.flush()
        except Exception as exc:  # the sink's own code (a strategy's), or a bug
            self.close()
            sink.on_error(exc)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is State.BUSY and self.sink is not None:
            if self._framing == UNTIL_CLOSE and self._head_seen:
                # A close-delimited body ends with the connection.
                sink = self.sink
                self.sink = None
                self.state = State.CLOSED
                sink.on_complete(False)
                return
            reason = "backend closed the connection"
            if exc is not None:
                reason = f"backend connection failed: {exc}"
            self._fail(reason, broken=False)
        self.state = State.CLOSED
        self.pool.forget(self)

    def pause_writing(self) -> None:
        pass  # request bodies are bounded and already in memory; the transport buffers them

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ------------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._done:
            # The backend sent a second response after the one asked for, in the same
            # read: stop parsing here, so that nothing of it reaches the client.
            raise _SecondResponse
        status = self.parser.get_status_code()
        head = self._head
        start = self._scan
        while head[start : start + 1] in (b"\r", b"\n"):  # llhttp skips blank lines
            start += 1
        end = head.find(HEAD_END, start) + len(HEAD_END)
        if 100 <= status < 200:
            # 1xx interim answers (100 Continue, 103 Early Hints) are not relayed.
            self._informational = True
            self._scan = end
            return
        self._body = head[end:]
        self._head = b""
        self._scan = 0
        head = head[start:end]
        framing = self._read_fields(head)
        if self._head_only:
            self._head_answered(status, head)
            return
        if status in (204, 304):
            framing = NO_BODY
            self._remaining = 0
        self._framing = framing
        self._head_seen = True
        assert self.sink is not None
        self.sink.on_head(status, head, framing)

    def _read_fields(self, head: bytes) -> int:
        """The framing a response head gives its body; ``connection`` and ``marks`` for
        the relay."""
        framing = UNTIL_CLOSE
        self.connection = None
        marks = 0
        for name, value in _HEAD_FIELDS.findall(head):
            size = len(name)
            if size == 14:  # content-length; a chunked one wins over it (RFC 9112 6.3)
                if framing != CHUNKED:
                    framing = LENGTH
                    self._remaining = int(value)
            elif size == 12:  # content-type
                if value[:17].lower() == b"text/event-stream":
                    marks |= EVENT_STREAM
            elif size == 17:  # transfer-encoding
                marks |= TRANSFER_ENCODING
                if value.rstrip().lower().endswith(b"chunked"):
                    framing = CHUNKED
                    self._remaining = -1
            else:
                marks |= HOP_LINES
                if size == 10 and name[0] in b"cC":  # connection, not keep-alive
                    self.connection = value
        self.marks = marks
        return framing

    def on_message_complete(self) -> None:
        if self._probing:
            self._probe_hit = True
        elif self._informational:
            self._informational = False
        else:
            self._done = True
            self._reusable = self.parser.should_keep_alive()
            # The read being parsed ends the response: what follows its end in the read
            # is not relayed, and the connection is not reused.
            body = self._body
            if self._remaining >= 0:
                if len(body) > self._remaining:
                    self._body = body[: self._remaining]
                    self._reusable = False
            elif self._framing == CHUNKED and not body.endswith(CHUNKED_END[2:]):
                # Trailers, or bytes after the last chunk (or they followed the response
                # from llhttp's view): relay through the last chunk.
                self._body = _through_last_chunk(body)
                self._reusable = False

    # --- used by the proxy -------------------------------------------------------

    def send(
        self, sink: Sink, data: list[bytes], head_only: bool = False, pieces: bool = False
    ) -> None:
        """Start a request: ``data`` is the request head and body, written as they are.

        With ``pieces`` the sink gets the body de-chunked (for an HTTP/1.0 client).
        """
        self.state = State.BUSY
        self.sink = sink
        self.received_any = False
        self._framing = UNTIL_CLOSE
        self._head_only = head_only
        self._head_seen = False
        self._head = b""
        self._scan = 0
        self._remaining = -1
        self._done = False
        if pieces:
            if self._pieces_parser is None:
                self._pieces_parser = httptools.HttpResponseParser(_Pieces(self))
            self.parser = self._pieces_parser
        else:
            self.parser = self._raw_parser
        self.last_activity = self.loop.time()
        transport = self.transport
        assert transport is not None
        if len(data) == 1:
            transport.write(data[0])
        else:
            transport.writelines(data)

    def pause_reading(self) -> None:
        if self.transport is not None and self.state is State.BUSY:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        # Time spent paused, waiting on a slow client, is not the backend's silence.
        self.last_activity = self.loop.time()
        if self.transport is not None and self.state is State.BUSY:
            self.transport.resume_reading()

    def silent_for(self, now: float) -> float:
        """Seconds since the backend last sent anything (or reading last resumed)."""
        return now - self.last_activity

    def close(self) -> None:
        """Close now, discarding whatever is in flight (hang-up, timeout, broken)."""
        self.sink = None
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)

    def at_chunk_boundary(self) -> bool:
        """Whether the chunked body relayed so far ends between two chunks, so that a
        chunk of our own (an error event) may follow it.

        Asked only of a failed connection, whose parser is not used again: it is
        fed the last chunk, and ends its message only if it was between chunks.
        """
        self._probing = True
        self._probe_hit = False
        try:
            self.parser.feed_data(b"0\r\n\r\n")
        except httptools.HttpParserError:
            return False
        finally:
            self._probing = False
        return self._probe_hit

    def usable(self, now: float) -> bool:
        return (
            self.state is State.IDLE
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < self.pool.idle_timeout_s
        )

    # --- internals ------------------------------------------------------------

    def _head_answered(self, status: int, head: bytes) -> None:
        """The head of an answer to HEAD: it has no body, whatever its head says.
        httptools cannot be told a response answers HEAD; it is ended here, and the
        connection closed, since the parser would wait for a body that never comes."""
        self._framing = NO_BODY
        self._remaining = 0
        self._head_seen = True
        assert self.sink is not None
        self.sink.on_head(status, head, NO_BODY)
        self._complete(reusable=False)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__
        if cause is not None and not isinstance(cause, _SecondResponse):
            # A callback raised (httptools chains it): not the backend's bytes.
            raise cause from None
        if not self._done:
            # Where in this read the garbage starts is unknown: none of it is relayed.
            self._fail(f"backend sent broken HTTP: {exc}", broken=True)
            return
        self._reusable = False  # a complete response, then garbage

    def _complete(self, reusable: bool) -> None:
        sink = self.sink
        self.sink = None
        if sink is None:
            return
        if reusable:
            # llhttp resets itself after a complete keep-alive response: the parser
            # is reused, as uvicorn reuses its request parser.
            self.state = State.IDLE
        sink.on_complete(reusable)

    def _fail(self, reason: str, broken: bool) -> None:
        sink = self.sink
        self.close()
        if sink is not None:
            sink.on_lost(reason, broken)


class _Pieces:
    """The parser callbacks of a connection, plus ``on_body``: de-chunked pieces."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.on_headers_complete = conn.on_headers_complete
        self.on_message_complete = conn.on_message_complete
        self._conn = conn

    def on_body(self, piece: bytes) -> None:
        sink = self._conn.sink
        if sink is not None:
            sink.on_body(piece)


def _through_last_chunk(body: bytes) -> bytes:
    """A chunked body's last read, cut after its last chunk (the backend sent more).

    The end is found by its bytes; in an SSE stream CRLF appears only in the
    chunk framing, so the search cannot stop inside an event.
    """
    if body.startswith(CHUNKED_END[2:]):
        return body[: len(CHUNKED_END) - 2]
    end = body.find(CHUNKED_END)
    return body if end < 0 else body[: end + len(CHUNKED_END)]


class ConnectError(Exception):
    pass


class Pool:
    """Keep-alive connections to one service.

    ``max_idle`` bounds the connections kept open between requests; connections
    in use are bounded by the requests in flight (admission control caps those).
    Idle connections are handed out most-recently-used first, so the warm ones
    stay warm and the ones the backend may time out drift to the far end, where
    ``idle_timeout_s`` retires them.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int,
        idle_timeout_s: float,
        connect_timeout_s: float,
        ssl: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.host = host
        self.server_name = server_name or host  # what the certificate must name
        self.port = port
        self.ssl = ssl  # https://: every connection handshakes once, then is pooled alike
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.loop = asyncio.get_running_loop()
        self._idle: deque[UpstreamConnection] = deque()
        self.closed = False  # the service was removed: connections close as they return

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection ready for a request, or None (then ``connect``)."""
        idle = self._idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(self) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_name if self.ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectError(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout_s}s"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError(
                f"TLS handshake with {self.host}:{self.port} failed: {tls_reason(exc)}"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        conn.reused = False
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose response completed and may be reused."""
        if conn.state is not State.IDLE or len(self._idle) >= self.max_idle or self.closed:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it from the idle set if it was there."""
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().close()
