"""The backend side: one connection's protocol, and the per-service connection pool.

A connection's lifecycle is a small explicit state (h11's lesson)::

    IDLE --send()--> BUSY --response complete, keep-alive--> IDLE
      |                |
      +---lost/expired-+--lost, broken, must-close, aborted--> CLOSED

Only IDLE connections sit in the pool; a CLOSED one is never handed out again.
An idle connection the backend closes is noticed by ``connection_lost`` while it
waits, so it leaves the pool before anyone picks it (httpcore's ``has_expired``
readability check, done by the event loop for free).

Responses are parsed by httptools; the parser's callbacks hand the head and the
de-chunked body pieces straight to the request's :class:`Sink`, and after each
read the sink is flushed once, so a read that carried many SSE events becomes
one write to the client.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Protocol

import httptools

# Framing of a response body as the backend sent it.
LENGTH, CHUNKED, UNTIL_CLOSE, NO_BODY = range(4)


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    CLOSED = "closed"


class Sink(Protocol):
    """Receives one response from an upstream connection (the proxy's Exchange)."""

    def on_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int
    ) -> None: ...

    def on_body(self, piece: bytes) -> None: ...

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


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_framing",
        "_head_only",
        "_head_seen",
        "_headers",
        "_informational",
        "_reason",
        "idle_since",
        "last_activity",
        "loop",
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
        self.parser = httptools.HttpResponseParser(self)
        self.state = State.IDLE
        self.sink: Sink | None = None
        self.reused = False
        self.received_any = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._framing = UNTIL_CLOSE
        self._informational = False
        self._head_only = False
        self._head_seen = False

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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            sink.flush()
            self._fail(f"backend sent broken HTTP: {exc}", broken=True)
            return
        if self.sink is sink:
            sink.flush()

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

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # 1xx interim answers (100 Continue, 103 Early Hints) are not relayed.
            self._informational = True
            self._headers = []
            self._reason = b""
            return
        framing = UNTIL_CLOSE
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                framing = LENGTH
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                framing = CHUNKED
                break
        if self._head_only or status in (204, 304):
            framing = NO_BODY
        self._framing = framing
        self._head_seen = True
        assert self.sink is not None
        self.sink.on_head(status, self._reason, self._headers, framing)
        if self._head_only:
            # httptools cannot be told a response answers HEAD; end it here and
            # close, since the parser would wait for a body that never comes.
            self._complete(reusable=False)

    def on_body(self, body: bytes) -> None:
        self.sink.on_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.sink is not None:
            self._complete(self.parser.should_keep_alive())

    # --- used by the proxy -------------------------------------------------------

    def send(self, sink: Sink, data: list[bytes], head_only: bool = False) -> None:
        """Start a request: ``data`` is the request head and body, written as they are."""
        self.state = State.BUSY
        self.sink = sink
        self.received_any = False
        self._headers = []
        self._reason = b""
        self._framing = UNTIL_CLOSE
        self._head_only = head_only
        self._head_seen = False
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
        if self.transport is not None and self.state is State.BUSY:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now, discarding whatever is in flight (hang-up, timeout, broken)."""
        self.sink = None
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)

    def usable(self, now: float) -> bool:
        return (
            self.state is State.IDLE
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < self.pool.idle_timeout_s
        )

    # --- internals ------------------------------------------------------------

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
    ) -> None:
        self.host = host
        self.port = port
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
                    lambda: UpstreamConnection(self), self.host, self.port
                )
        except TimeoutError:
            raise ConnectError(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout_s}s"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
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
