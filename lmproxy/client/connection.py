"""The client side: one asyncio.Protocol per client connection, HTTP/1.1 parsed by httptools.

``data_received`` only feeds the parser; the parser's callbacks build a
:class:`ClientRequest`. Complete requests wait in a small deque and are answered
strictly in order (pipelining); reading pauses while too many wait. Every
protocol error the parser or a limit raises becomes its status and a close, in
one place (``_reject``).

Everything a client can make the router hold is bounded, and every state of a
connection has a deadline:

- bytes the parser has not turned into a request yet: ``data_received`` counts
  them as they arrive (``_stalled``: bytes since the parser last made
  progress), so a header, a chunk-size line or a trailer that never ends is
  refused within one read of its limit, whatever httptools has completed;
- objects, not only bytes: a request has at most ``MAX_HEADERS`` headers
  (trailers included), and a body that comes in many reads grows one buffer;
- queued requests: reading stops while ``MAX_PIPELINED`` wait, while they hold
  more than ``QUEUED_BODY_BYTES``, while an error waits to be answered, and
  while the transport is over its high-water mark, so the router's own answers
  obey write flow control as proxied ones do. A client that hangs up while its
  reading is paused is noticed by a poll of its socket (``peer_gone``);
- time: a connection keeps one ``deadline`` (fresh or in headers: the header
  timeout; in a body: the body timeout, re-armed by every read; idle between
  requests: the keep-alive timeout), and the router's sweep ends the
  connections whose deadline passed, or whose answers the client has not read
  for the send timeout. None of it costs a timer per request.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

import httptools

from lmproxy.client.accept import source_of
from lmproxy.client.request import find_header
from lmproxy.errors import Fault, error_response

if TYPE_CHECKING:
    from lmproxy.client.accept import Gate
    from lmproxy.config import Config
    from lmproxy.keys.limits import Key
    from lmproxy.protocols import Underway

MAX_HEADER_BYTES = 64 * 1024
# Each header is held as three objects (about 150 bytes for a tiny one), so a 64 KiB head
# of tiny headers would cost over a MiB: the count is bounded too (trailers included).
MAX_HEADERS = 100
# A chunk-size line with its extensions, the trailers, or blank lines between requests.
MAX_LINE_BYTES = 4 * 1024
MAX_PIPELINED = 8  # complete requests waiting behind the one being answered: stop reading
MAX_QUEUED = 64  # past this (one read may hold many small requests) the rest is refused
QUEUED_BODY_BYTES = 1024 * 1024  # request bodies waiting behind the one being answered
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
INFINITY = float("inf")
LINGER_S = 2.0  # how long a rejected client may go on sending before the close
_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


class ClientHost(Protocol):
    """What a client connection needs of the router (``app.Router``)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def config(self) -> Config: ...

    @property
    def connections(self) -> set[ClientConnection]: ...

    @property
    def paused(self) -> set[ClientConnection]: ...  # reading paused: polled for hang-ups

    @property
    def gate(self) -> Gate: ...  # the connections admitted, counted from accept

    @property
    def via_token(self) -> bytes: ...

    @property
    def draining(self) -> bool: ...

    def dispatch(self, client: ClientConnection, request: ClientRequest) -> None: ...

    def watch_paused(self, client: ClientConnection) -> None: ...


class ClientRequest:
    __slots__ = (
        "body",
        "body_buffer",
        "body_size",
        "connection",
        "expect_continue",
        "headers",
        "http_minor",
        "is_json",
        "keep_alive",
        "key",
        "looped",
        "method",
        "path",
        "received_at",
        "request_id",
        "target",
        "traceparent",
        "upgrade",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""  # path and query, as sent
        self.path = b""
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.body = b""
        # A body in more than one read grows here: one buffer, about the body's size,
        # where a list of the reads' bytes would cost ~40 bytes more per read.
        self.body_buffer: bytearray | None = None
        self.body_size = 0
        self.keep_alive = True
        self.http_minor = 1
        self.is_json = False
        self.expect_continue = False  # a 100 Continue is owed it, when its turn comes
        self.received_at = 0.0
        self.request_id: bytes | None = None  # the client's X-Request-ID
        self.connection: bytes | None = None  # the Connection header: it may name hop-by-hop ones
        self.looped = False  # it carries this router's own Via: it came round a loop
        self.upgrade = False  # it offered a protocol upgrade (served as HTTP/1.1, then closed)
        self.traceparent: bytes | None = None  # W3C trace context: the caller's span
        self.key: Key | None = None  # the [[keys]] entry it was made with (limits.py)

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; carries the answer.

    httptools reports it as an ``HttpParserCallbackError`` whose context it is.
    """

    def __init__(self, fault: Fault, message: str) -> None:
        self.fault = fault
        self.message = message


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_budget",
        "_header_bytes",
        "_ignore_input",
        "_parsing",
        "_pending_reject",
        "_queue",
        "_stalled",
        "closing",
        "current",
        "deadline",
        "flow",
        "loop",
        "parser",
        "router",
        "source",
        "transport",
        "underway",
    )

    def __init__(self, router: ClientHost, source: str | None = None) -> None:
        self.router = router
        # What the gate counts it against; None until admitted. A TLS connection was
        # admitted at its accept (accept.Handshake), a plain one is in connection_made.
        self.source = source
        self.loop = router.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: ClientRequest | None = None  # being answered
        # What answers the current request: a proxied one's journey, or a task that
        # answers for the whole router. Set and cleared by the request path alone.
        self.underway: Underway | None = None
        self.closing = False
        self.flow = FlowControl(self)
        self._parsing: ClientRequest | None = None
        self._queue: deque[ClientRequest] = deque()
        self._header_bytes = 0
        self._stalled = 0  # bytes received since the parser last made progress
        self._budget = 0  # requests this read may still start at once (see data_received)
        self._ignore_input = False  # lingering, or past an upgrade offer: reads are dropped
        self._pending_reject: _Reject | None = None
        # When the connection is due to be closed for idling, slow headers or a
        # silent body; the router's sweep checks it (no timer per request).
        self.deadline = INFINITY

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.transport = transport  # type: ignore[assignment]
        router = self.router
        if self.source is None:
            source = source_of(transport.get_extra_info("peername"))
            refusal = router.gate.admit(source)
            if refusal is not None:
                # Refuse fast: serving one more would slow every connection already here.
                self.closing = True
                transport.write(refusal)  # type: ignore[attr-defined]
                transport.close()
                return
            self.source = source
        router.connections.add(self)
        # A fresh connection has until the header timeout to send a request.
        self._arm(router.config.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._ignore_input:
            return
        # Counted before parsing; every callback that shows progress resets it, so
        # what is left is what httptools holds without having made anything of it.
        self._stalled += len(data)
        # One read may hold thousands of tiny pipelined requests: a few start at once,
        # the rest wait their turn of the loop, so other clients are served meanwhile.
        self._budget = MAX_PIPELINED
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0] :] if exc.args else b"")
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self._stalled > MAX_LINE_BYTES:
            self._check_stall()
        if not self._budget and self.current is None and self._queue:
            self.loop.call_soon(self._drain)
        request = self._parsing
        if request is not None and request.method and self.current is None:
            # In a body: the body timeout is the longest silence, so each read re-arms it.
            self._arm(self.router.config.body_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        router = self.router
        router.connections.discard(self)
        if self.source is not None and self.transport is not None:
            router.gate.release(self.source)
            self.source = None
        self.flow.stop_watching()
        self._queue.clear()
        if self.underway is not None:
            self.underway.cancel()
        # This object lives on in reference cycles (its parser's callbacks, its
        # FlowControl) until the garbage collector runs, and that counts objects, not
        # bytes: what its requests hold (a head, a body of up to --max-body-size) is let
        # go now, so it is freed as the connection closes, not some rounds later. The
        # journey under way keeps its own reference to its request while it ends (one
        # that waited for a slot has left the admission queue, above).
        self._parsing = None
        self.current = None

    def pause_writing(self) -> None:
        self.flow.writing_paused(self.loop.time())
        if self.underway is not None:
            self.underway.pause()
        self._flow()

    def resume_writing(self) -> None:
        self.flow.writing_resumed()
        if self.underway is not None:
            self.underway.resume()
        if self.current is None and self._queue and not self.closing:
            self._next()
        else:
            self._flow()

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
        # Trailers come here too, and count against the same limit.
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()
        headers = self._parsing.headers  # type: ignore[union-attr]
        if len(headers) >= MAX_HEADERS:
            raise _Reject(
                Fault.HEADERS_TOO_LARGE,
                f"more than {MAX_HEADERS} request headers (trailers included); send fewer",
            )
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._stalled = 0
        request = self._parsing
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        request.http_minor = 0 if parser.get_http_version() == "1.0" else 1
        request.keep_alive = parser.should_keep_alive()
        question = request.target.find(b"?")
        request.path = request.target if question < 0 else request.target[:question]
        if self.current is None:
            self.deadline = INFINITY  # data_received arms the body timeout if a body follows
        limit = self.router.config.max_body_size
        body_expected = False
        unusual = False  # a header _note_unusual acted on
        for name, value in request.headers:
            if name not in _NOTED:
                continue
            # Content-Length and Content-Type, in nearly every request, are read here;
            # the rest in a call made only for a request that has them.
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = -1  # httptools rejects it right after
                if size > limit:
                    raise _body_too_large(size, limit)
                body_expected = size > 0
            elif name == b"content-type":
                request.is_json = b"json" in value.lower()
            else:
                unusual = True
                body_expected = self._note_unusual(request, name, value, body_expected)
        if unusual:
            self._unusual_head(request, body_expected)

    def on_body(self, body: bytes) -> None:
        self._stalled = 0
        request = self._parsing
        assert request is not None
        request.body_size += len(body)
        if request.body_size > self.router.config.max_body_size:
            raise _Reject(
                Fault.BODY_TOO_LARGE,
                f"request body is over the limit of {self.router.config.max_body_size} bytes "
                "(--max-body-size)",
            )
        if not request.body:
            request.body = body  # most bodies come in one read: kept as they came
            return
        buffer = request.body_buffer
        if buffer is None:
            buffer = request.body_buffer = bytearray(request.body)
        buffer += body

    def on_chunk_header(self) -> None:
        self._stalled = 0

    def on_message_complete(self) -> None:
        self._stalled = 0
        request = self._parsing
        assert request is not None
        if request.upgrade:
            return  # httptools skips the body of an upgrade offer; _on_upgrade reads it
        self._parsing = None
        buffer = request.body_buffer
        if buffer is not None:
            request.body = bytes(buffer)
            request.body_buffer = None
        request.received_at = time.perf_counter()
        queue = self._queue
        if len(queue) >= MAX_QUEUED:
            raise _Reject(
                Fault.TOO_MANY_PIPELINED,
                f"more than {MAX_QUEUED} pipelined requests wait unanswered on this "
                "connection; read the answers before sending more",
            )
        queue.append(request)
        if self.current is None and not self.flow.write_paused and self._budget:
            self._budget -= 1
            self._next()
        elif not self.flow.read_paused:
            self._flow()

    # --- used by the router and the proxy -----------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data)  # type: ignore[union-attr]

    def respond(self, data: bytes) -> None:
        """Send a complete response to the current request and move on."""
        self.write(data)
        self.response_done()

    def respond_error(self, fault: Fault, message: str, extra_headers: bytes = b"") -> None:
        keep_alive = self.current is not None and self.current.keep_alive
        self.write(error_response(fault, message, keep_alive, extra_headers))
        if not keep_alive:
            self.current = None
            self.close()
            return
        self.response_done()

    def response_done(self) -> None:
        request = self.current
        self.current = None
        if request is None or not request.keep_alive or self.closing or self.router.draining:
            self.close()
            return
        if self._queue:
            if not self.flow.write_paused:
                self._next()
                return
        elif self._pending_reject is not None:
            reject, self._pending_reject = self._pending_reject, None
            self._reject(reject)
            return
        elif self._parsing is None:
            self._arm(self.router.config.keepalive_timeout)
        elif self._parsing.method:
            self._arm(self.router.config.body_timeout)
            if self._parsing.expect_continue:
                self._send_continue(self._parsing)  # its turn came: its body may follow
        else:
            self._arm(self.router.config.header_timeout)
        if self.flow.read_paused:
            self._flow()

    def close(self) -> None:
        """Close once everything written so far has been sent."""
        if not self.closing:
            self.closing = True
            self.flow.stop_watching()
            self.transport.close()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Close at once, dropping what is unsent: the client is gone or will not read."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def peer_gone(self) -> bool:
        """Whether the client hung up, asked of the socket itself: while reading is
        paused, the event loop does not look, and would not see the close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), _HANGUP)
        return bool(poller.poll(0))

    # --- internals ------------------------------------------------------------

    def _next(self) -> None:
        request = self._queue.popleft()
        self.current = request
        if self.flow.read_paused:
            self._flow()
        self.router.dispatch(self, request)

    def _drain(self) -> None:
        """Start the requests a crowded read left queued (data_received's budget)."""
        if self.current is None and self._queue and not self.flow.write_paused and not self.closing:
            self._next()

    def _flow(self) -> None:
        """Read from the client only while what waits for it is small: a few queued
        requests, no error waiting its turn, and a transport that takes what is written."""
        queue = self._queue
        stop = (
            self.flow.write_paused
            or self._pending_reject is not None
            or len(queue) >= MAX_PIPELINED
            or sum(len(r.body) for r in queue) > QUEUED_BODY_BYTES
        )
        if stop == self.flow.read_paused or self.closing:
            return
        if stop:
            self.flow.pause_reading()
        else:
            self.flow.resume_reading()

    def _check_stall(self) -> None:
        """Bytes came that the parser has made nothing of for too long: refuse them."""
        request = self._parsing
        if request is not None and request.method:
            self._reject(
                _Reject(
                    Fault.BAD_REQUEST,
                    f"a chunk-size line (with its extensions) or the trailers are over "
                    f"{MAX_LINE_BYTES} bytes",
                )
            )
        elif request is None:
            self._reject(
                _Reject(
                    Fault.BAD_REQUEST, f"over {MAX_LINE_BYTES} bytes that do not begin a request"
                )
            )
        elif self._stalled > MAX_HEADER_BYTES:
            self._reject(_headers_too_large())

    def _reject(self, reject: _Reject) -> None:
        """Answer a request the router cannot read, then close: the stream is unusable."""
        if self.closing:
            return
        # Nothing more is read: the parser stopped at an error, or must not go on.
        self._ignore_input = True
        self._parsing = None
        if self.current is not None or self._queue:
            # Answer in order, after the responses before it (if the connection lives on).
            self._pending_reject = reject
            self._flow()
            if self.current is None:
                self.loop.call_soon(self._drain)
            return
        self.write(error_response(reject.fault, reject.message, keep_alive=False))
        self._linger()

    def _linger(self) -> None:
        """Close after an error without destroying the error.

        Closing a socket with unread input makes the kernel send RST, which can
        discard the answer before the client reads it (a client still sending
        its oversized body or headers). So: half-close, read and drop what
        still comes for a moment, then close, as nginx's lingering_close does.
        The moment is bounded: what is dropped costs no memory, and a client
        that has not read the answer by then is cut off.
        """
        transport = self.transport
        assert transport is not None
        self.closing = True
        self._ignore_input = True
        if transport.can_write_eof():
            transport.write_eof()
        self.flow.resume_reading()  # what still comes is read and dropped
        self.loop.call_later(LINGER_S, _end_linger, transport)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        # httptools chains what a callback raised as the error's context.
        reject = exc.__context__
        if not isinstance(reject, _Reject):
            reject = _Reject(Fault.BAD_REQUEST, f"malformed HTTP request: {_describe(exc)}")
        self._reject(reject)

    def _note_unusual(
        self, request: ClientRequest, name: bytes, value: bytes, body_expected: bool
    ) -> bool:
        """A noted header other than Content-Length and Content-Type, read into
        ``request``; returns ``body_expected``, made true by a Transfer-Encoding."""
        if name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                # httptools accepts "gzip, chunked"; the backend would then get a
                # compressed body with nothing saying so.
                raise _Reject(
                    Fault.NOT_IMPLEMENTED, "only 'Transfer-Encoding: chunked' is supported"
                )
            return True
        if name == b"expect":
            request.expect_continue = value.lower() == b"100-continue"
        elif name == b"x-request-id":
            if request.request_id is None:
                request.request_id = value
        elif name == b"connection":
            request.connection = value
        elif name == b"via":
            request.looped = request.looped or self.router.via_token in value
        elif name == b"upgrade":
            request.upgrade = True
        elif name == b"traceparent":
            request.traceparent = value
        return body_expected

    def _unusual_head(self, request: ClientRequest, body_expected: bool) -> None:
        """What the unusual headers ask once the whole head is read."""
        if request.upgrade:
            self._upgrade_offered(request, body_expected)
        if request.expect_continue:
            self._expect_continue(request, body_expected)

    def _upgrade_offered(self, request: ClientRequest, body_expected: bool) -> None:
        """An ``Upgrade`` header: no protocol is switched to (RFC 9110 7.8 lets a server
        ignore the offer), and the request is served as HTTP/1.1. httptools reads no
        further than an upgrade's head, so the connection closes after this request,
        and a body the offer came with is read by ``_on_upgrade``."""
        if not self.parser.should_upgrade():
            request.upgrade = False  # no "Connection: upgrade": an ordinary header
            return
        request.keep_alive = False
        # From here on, ``upgrade`` means "httptools will skip a body that follows".
        request.upgrade = body_expected and request.method != b"CONNECT"

    def _on_upgrade(self, rest: bytes) -> None:
        """httptools stopped at an upgrade; ``rest`` is what came after the head."""
        self._ignore_input = True  # no further request is read on this connection
        request = self._parsing
        if request is not None and request.upgrade:
            request.upgrade = False
            self._ignore_input = False
            # The body httptools skipped, read by a parser that sees only its framing.
            self.parser = httptools.HttpRequestParser(_BodyOnly(self))
            framing = b"transfer-encoding: chunked"
            for name, value in request.headers:
                if name == b"content-length":
                    framing = b"content-length: " + value
            self._stalled = 0
            self.data_received(b"POST / HTTP/1.1\r\n%s\r\n\r\n%s" % (framing, rest))
            return
        for queued in (self.current, *self._queue):
            if queued is not None:
                queued.keep_alive = False
        if self.current is None:
            if self._queue:
                self.loop.call_soon(self._drain)
            else:
                self.close()  # its answer is written already

    def _expect_continue(self, request: ClientRequest, body_expected: bool) -> None:
        """``Expect: 100-continue``: the client may wait for a 100 before it sends the
        body (RFC 9110 10.1.1). It gets one only if it speaks HTTP/1.1 (no 1xx may go
        to an HTTP/1.0 client, RFC 9110 15.2) and a body is expected, and only once its
        request is the next to be answered: sent earlier, the 100 would land inside
        the answer before it. A request behind others gets it from ``response_done``
        when its turn comes, if its body is still being read by then."""
        if not body_expected or request.http_minor == 0:
            request.expect_continue = False
        elif self.current is None and not self._queue:
            self._send_continue(request)

    def _send_continue(self, request: ClientRequest) -> None:
        request.expect_continue = False
        self.write(CONTINUE_RESPONSE)

    def _arm(self, delay_s: float) -> None:
        self.deadline = self.loop.time() + delay_s

    def on_deadline(self) -> None:
        """The router's sweep found the deadline passed."""
        self.deadline = INFINITY
        if self.current is not None or self.closing or self._queue:
            return  # an answer is under way: its own deadlines (and --send-timeout) hold
        request = self._parsing
        if request is not None:
            if request.method:
                message = (
                    f"the request body stalled: nothing came for "
                    f"{self.router.config.body_timeout:g}s (--body-timeout)"
                )
            else:
                message = (
                    f"request headers took over {self.router.config.header_timeout:g}s "
                    "(--header-timeout)"
                )
            self._parsing = None
            self.write(error_response(Fault.REQUEST_TIMEOUT, message, keep_alive=False))
            self._linger()
            return
        self.close()


class FlowControl:
    """A client connection's flow control, both ways, as uvicorn's FlowControl: the one
    place its transport's reading is paused or resumed, and that remembers whether
    its writing is.

    Writing: the transport says when its buffer passes the high-water mark
    (``writing_paused``) and when it drains (``writing_resumed``); meanwhile the
    backend's response is not read and no new request starts. Reading: the
    connection decides (``ClientConnection._flow``); while it is paused, the
    router polls the socket for a hang-up, which the event loop would not see.
    """

    __slots__ = ("_conn", "read_paused", "transport", "write_paused", "write_paused_at")

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self.transport: asyncio.Transport | None = None
        self.read_paused = False
        self.write_paused = False
        self.write_paused_at = 0.0  # the router's --send-timeout counts from here

    def writing_paused(self, now: float) -> None:
        self.write_paused = True
        self.write_paused_at = now

    def writing_resumed(self) -> None:
        self.write_paused = False

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
            self._conn.router.watch_paused(self._conn)

    def resume_reading(self) -> None:
        self.stop_watching()
        if self.read_paused:
            self.read_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def stop_watching(self) -> None:
        self._conn.router.paused.discard(self._conn)


class _BodyOnly:
    """Parser callbacks for the body of an upgrade offer, read after httptools
    stopped at its head: the head fed to this parser is made up, so only the body
    and the message's end reach the connection, and nothing after that message."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._done = False

    def on_headers_complete(self) -> None:
        pass

    def on_chunk_header(self) -> None:
        self._conn._stalled = 0

    def on_body(self, body: bytes) -> None:
        if not self._done:
            self._conn.on_body(body)

    def on_message_complete(self) -> None:
        if not self._done:
            self._done = True
            self._conn._ignore_input = True
            self._conn.on_message_complete()


def _end_linger(transport: asyncio.Transport) -> None:
    if transport.get_write_buffer_size():
        transport.abort()  # the client never read its answer: do not wait for it
    else:
        transport.close()


# The request headers on_headers_complete acts on; the rest are only kept.
_NOTED = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"expect",
        b"x-request-id",
        b"connection",
        b"via",
        b"upgrade",
        b"traceparent",
    }
)


def _body_too_large(size: int, limit: int) -> _Reject:
    return _Reject(
        Fault.BODY_TOO_LARGE,
        f"request body of {size} bytes is over the limit of {limit} bytes (--max-body-size)",
    )


def _headers_too_large() -> _Reject:
    return _Reject(Fault.HEADERS_TOO_LARGE, f"request headers are over {MAX_HEADER_BYTES} bytes")


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
