"""The client side: one asyncio.Protocol per client connection, HTTP/1.1 parsed by httptools.

``data_received`` only feeds the parser; the parser's callbacks build a
:class:`ClientRequest`. Complete requests wait in a small deque and are answered
strictly in order (pipelining); reading pauses while too many wait. Every
protocol error the parser or a limit raises becomes its status and a close, in
one place (``_reject``).

Timeouts cost nothing per request: a connection keeps one ``deadline`` (from a
request's first byte to the end of its headers: the header timeout; while idle
between requests: the keep-alive timeout) and the router's sweep closes the
connections whose deadline has passed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from lmproxy.errors import error_response
from lmproxy.request import find_header

if TYPE_CHECKING:
    from lmproxy.app import Router
    from lmproxy.proxy import Exchange, Journey

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 8  # complete requests waiting behind the one being answered
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
INFINITY = float("inf")
TOO_MANY_CONNECTIONS = error_response(
    503, "the router is at its connection limit (--max-connections); retry shortly", False
)
LINGER_S = 2.0  # how long a rejected client may go on sending before the close


class ClientRequest:
    __slots__ = (
        "body",
        "body_parts",
        "body_size",
        "expect_continue",
        "headers",
        "http_minor",
        "is_json",
        "keep_alive",
        "method",
        "path",
        "received_at",
        "request_id",
        "target",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""  # path and query, as sent
        self.path = b""
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.body = b""
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.keep_alive = True
        self.http_minor = 1
        self.is_json = False
        self.expect_continue = False
        self.received_at = 0.0
        self.request_id: bytes | None = None  # the client's X-Request-ID

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; carries the answer.

    httptools reports it as an ``HttpParserCallbackError`` whose context it is.
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_header_bytes",
        "_lingering",
        "_parsing",
        "_pending_reject",
        "_queue",
        "_read_paused",
        "closing",
        "current",
        "deadline",
        "exchange",
        "loop",
        "parser",
        "router",
        "task",
        "transport",
        "waiting",
        "write_paused",
    )

    def __init__(self, router: Router) -> None:
        self.router = router
        self.loop = router.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: ClientRequest | None = None  # being answered
        self.exchange: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.waiting: Journey | None = None  # queued for a free slot (admission.py)
        self.closing = False
        self.write_paused = False
        self._parsing: ClientRequest | None = None
        self._queue: deque[ClientRequest] = deque()
        self._header_bytes = 0
        self._lingering = False
        self._read_paused = False
        self._pending_reject: _Reject | None = None
        # When the connection is due to be closed for idling or slow headers;
        # the router's sweep checks it (no timer per request).
        self.deadline = INFINITY

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        router = self.router
        if len(router.connections) >= router.max_connections:
            # Refuse fast: serving one more would slow every connection already here.
            self.closing = True
            transport.write(TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
            transport.close()
            return
        router.connections.add(self)
        self._arm(self.router.config.keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._on_upgrade()
        except httptools.HttpParserError as exc:
            # httptools chains what a callback raised as the error's context.
            reject = exc.__context__
            if not isinstance(reject, _Reject):
                reject = _Reject(400, f"malformed HTTP request: {_describe(exc)}")
            self._reject(reject)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.router.connections.discard(self)
        if self.exchange is not None:
            self.exchange.client_gone()
        elif self.task is not None and not self.task.done():
            self.task.cancel()
        elif self.waiting is not None:
            self.router.admission.leave(self.waiting)
            self.waiting = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume()

    # --- httptools callbacks ------------------------------------------------------

    # No on_message_begin: every request has a URL, and one callback fewer per
    # request is worth it; on_url may come in pieces, the first one begins it.

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        if request is None:
            request = self._parsing = ClientRequest()
            self._header_bytes = 0
            if self.current is None:
                self._arm(self.router.config.header_timeout)
        request.target += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted inline, not in a helper: this runs for every header of every request.
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()
        self._parsing.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        request.http_minor = 0 if parser.get_http_version() == "1.0" else 1
        request.keep_alive = parser.should_keep_alive()
        question = request.target.find(b"?")
        request.path = request.target if question < 0 else request.target[:question]
        if self.current is None:
            self.deadline = INFINITY  # the body may take its time
        limit = self.router.config.max_body_size
        for name, value in request.headers:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = -1  # httptools rejects it right after
                if size > limit:
                    raise _Reject(
                        413,
                        f"request body of {size} bytes is over the limit of {limit} bytes "
                        "(--max-body-size)",
                    )
            elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                # httptools accepts "gzip, chunked"; the backend would then get a
                # compressed body with nothing saying so.
                raise _Reject(501, "only 'Transfer-Encoding: chunked' is supported")
            elif name == b"content-type":
                request.is_json = b"json" in value.lower()
            elif name == b"expect" and value.lower() == b"100-continue":
                request.expect_continue = True
            elif name == b"x-request-id" and request.request_id is None:
                request.request_id = value
        if request.expect_continue and self.transport is not None:
            self.transport.write(CONTINUE_RESPONSE)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.body_size += len(body)
        if request.body_size > self.router.config.max_body_size:
            raise _Reject(
                413,
                f"request body is over the limit of {self.router.config.max_body_size} bytes "
                "(--max-body-size)",
            )
        request.body_parts.append(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._parsing = None
        parts = request.body_parts
        request.body = parts[0] if len(parts) == 1 else b"".join(parts)
        request.body_parts = []
        request.received_at = time.perf_counter()
        self._queue.append(request)
        if self.current is None:
            self._next()
        elif len(self._queue) >= MAX_PIPELINED and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    # --- used by the router and the proxy -----------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data)  # type: ignore[union-attr]

    def respond(self, data: bytes) -> None:
        """Send a complete response to the current request and move on."""
        self.write(data)
        self.response_done()

    def respond_error(self, status: int, message: str, extra_headers: bytes = b"") -> None:
        keep_alive = self.current is not None and self.current.keep_alive
        self.write(error_response(status, message, keep_alive, extra_headers))
        if not keep_alive:
            self.current = None
            self.close()
            return
        self.response_done()

    def response_done(self) -> None:
        request = self.current
        self.current = None
        self.task = None
        if request is None or not request.keep_alive or self.closing or self.router.draining:
            self.close()
            return
        if self._read_paused and len(self._queue) < MAX_PIPELINED:
            self._read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self._queue:
            self._next()
        elif self._pending_reject is not None:
            reject, self._pending_reject = self._pending_reject, None
            self._reject(reject)
        elif self._parsing is None:
            self._arm(self.router.config.keepalive_timeout)
        else:
            self._arm(self.router.config.header_timeout)

    def close(self) -> None:
        """Close once everything written so far has been sent."""
        if not self.closing:
            self.closing = True
            self.transport.close()  # type: ignore[union-attr]

    # --- internals ------------------------------------------------------------

    def _next(self) -> None:
        request = self._queue.popleft()
        self.current = request
        self.router.dispatch(self, request)

    def _reject(self, reject: _Reject) -> None:
        """Answer a request the router cannot read, then close: the stream is unusable."""
        if self.closing:
            return
        if self.current is not None:
            # Answer in order, after the response in flight (if the connection lives on).
            if self.current.keep_alive:
                self._pending_reject = reject
            self._parsing = None
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._read_paused = True
            return
        self.write(error_response(reject.status, reject.message, keep_alive=False))
        self._linger()

    def _linger(self) -> None:
        """Close after an error without destroying the error.

        Closing a socket with unread input makes the kernel send RST, which can
        discard the answer before the client reads it (a client still sending
        its oversized body or headers). So: half-close, read and drop what
        still comes for a moment, then close, as nginx's lingering_close does.
        """
        transport = self.transport
        assert transport is not None
        self.closing = True
        self._lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self.loop.call_later(LINGER_S, transport.close)

    def _on_upgrade(self) -> None:
        # Protocol upgrades (WebSocket, h2c) are not offered. A request that asked
        # for one was complete and is answered normally; the connection then
        # closes, since the parser will not read past an upgrade.
        for request in (self.current, *self._queue):
            if request is not None:
                request.keep_alive = False
        if self.current is None and not self._queue:
            self._reject(_Reject(400, "protocol upgrades are not supported"))

    def _arm(self, delay_s: float) -> None:
        self.deadline = self.loop.time() + delay_s

    def on_deadline(self) -> None:
        """The router's sweep found the deadline passed."""
        self.deadline = INFINITY
        if self.current is not None or self.closing:
            return
        if self._parsing is not None:
            self.write(error_response(408, "request headers took too long", keep_alive=False))
            self._linger()
            return
        self.close()


def _headers_too_large() -> _Reject:
    return _Reject(431, f"request headers are over {MAX_HEADER_BYTES} bytes")


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
