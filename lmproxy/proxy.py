"""One request's journey: validate -> choose -> forward -> relay -> account.

A :class:`Journey` carries one proxied request. It resolves the route, asks the
strategy for a service and, when that service's pool has an idle connection,
sends the original bytes at once: no task is created on that path. Only a
request that must open a new connection runs a short task for the connect.
From the send on, the upstream connection feeds an :class:`Exchange` the
response head and, once per backend read, the body bytes as they came, which
it writes to the client in one write (a chunked body passes with its own
framing; only a close-delimited one is framed here). When the exchange has an
outcome, the journey retries, reports or accounts, from a ``call_soon`` callback
(never inside a parser callback).

Retries happen only while nothing has reached the client: a connect failure, a
connection that dropped before any response byte, or (``--retry-on-5xx``) a
500, 502, 503, 504 or 429 head, which is dropped, not relayed, when another
service may answer. Once the response head is written, a failure ends the
stream with an SSE error event (or a cut connection, for a body that cannot
carry one). The 5xx answers and failures also step the service's circuit
breaker (``breaker.py``, through the registry); a 429 never does.

Timeouts are checked by the router's sweep (``check_timeout``), not by a timer
per request.

Every way into a journey from outside it (the dispatch, a parser callback, a
``call_soon``, a connect task, the admission queue, a key's verdict) is
supervised: an exception there, from a strategy plugin or a bug, ends that one
request in :meth:`Journey.crash` (502, or the error event once the head is out),
returns every slot it held and is logged once per cause (:func:`log_crash`).
The guards are ``try`` blocks around code that runs anyway: free in CPython 3.11
until something raises.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from lmproxy import tracing
from lmproxy.admission import has_room
from lmproxy.breaker import SERVER_ERRORS
from lmproxy.config import fallback_chain
from lmproxy.errors import Fault, ProxyError, sse_error_event
from lmproxy.limits import UNLIMITED, Refusal
from lmproxy.metrics import log_access, usage_tokens, whole_usage_tokens
from lmproxy.registry import LOGGED_SERVICES, name_models
from lmproxy.request import (
    MODEL_PATHS,
    USAGE_PATHS,
    RequestHead,
    RouteRequest,
    decode_head,
    find_header,
    form_model,
    forwarded_head,
    is_form,
    naming_model,
    with_model,
    with_stream_usage,
)
from lmproxy.upstream import LENGTH, NO_BODY, UNTIL_CLOSE, ConnectError, UpstreamConnection
from strategies.size import by_cache_type

if TYPE_CHECKING:
    from lmproxy.limits import Grant, Key, Verdict
    from lmproxy.protocols import Exchanging, ProxyHost
    from lmproxy.registry import Service
    from lmproxy.server import ClientConnection, ClientRequest

log = logging.getLogger("lmproxy")

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _header_lines(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """Header lines named ``names``, each with the CRLF before it, in a response head."""
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"\r\n(?:%s)[ \t]*:[^\r]*" % alternatives, re.I)


# The response head's lines to drop; a chunked body relayed as the backend framed
# it keeps its Transfer-Encoding.
_HOP_BY_HOP_FIELDS = _header_lines(HOP_BY_HOP)
_HOP_BY_HOP_BUT_TE = _header_lines(HOP_BY_HOP - {b"transfer-encoding"})
_SSE_TYPE = re.compile(rb"\r\ncontent-type[ \t]*:[ \t]*text/event-stream", re.I)
# Request headers the router sets itself for the backend connection.
# traceparent: replaced by one naming the router's span (tracing.py).
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"traceparent"}
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
_named_cache: dict[bytes, frozenset[bytes]] = {}


def connection_names(value: bytes) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists beyond keep-alive and close: they
    are hop-by-hop too (RFC 9110 7.6.1). Cached: clients send the same few values."""
    names = _named_cache.get(value)
    if names is None:
        names = frozenset(t.strip().lower() for t in value.split(b",")) - _PLAIN_CONNECTION
        names -= {b""}
        if len(_named_cache) < 256:
            _named_cache[value] = names
    return names


_named_lines_cache: dict[frozenset[bytes], re.Pattern[bytes]] = {}


def drop_named(fields: bytes, connection: bytes) -> bytes:
    """A response head's fields less the ones its ``Connection`` header names."""
    names = connection_names(connection)
    if not names:
        return fields
    pattern = _named_lines_cache.get(names)
    if pattern is None:
        pattern = _header_lines(names)
        if len(_named_lines_cache) < 256:
            _named_lines_cache[names] = pattern
    return pattern.sub(b"", fields)


# Failures after which a model's fallback is tried (nothing has reached the client).
FALLBACK_FAULTS = frozenset(
    {
        Fault.NO_HEALTHY_SERVICE,
        Fault.MODEL_NOT_FOUND,
        Fault.BACKEND_UNREACHABLE,
        Fault.BACKEND_CLOSED,
        Fault.BACKEND_BROKEN,
    }
)
# Answered before any byte, these are dropped for another service's (--retry-on-5xx);
# a 429 is "busy": retried, never a breaker's step.
RETRIED_STATUSES = SERVER_ERRORS | {429}
_NONE: list[str] = []  # no fallbacks: shared, never changed (a journey gets its own list)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_BAD_PRIORITY = (
    "X-Priority must be an integer of at most 12 characters (higher is served first; "
    "default: the key's priority)"
)


def header_value(text: str) -> bytes:
    """``text`` for a response header: UTF-8, no control characters."""
    return _CONTROL.sub(b"", text.encode("utf-8", "replace"))


LARGE_BODY = 64 * 1024  # above this the body is written beside the head, not copied onto it
TAIL_BYTES = 4096  # of a response kept for its usage object
# A tpm key's answer that ends without usage is charged an estimate: its prompt at one
# token per BYTES_PER_TOKEN of the request body (as sent), and one token per SSE event
# relayed (an engine sends about one token per event), or for a body that is not a
# stream, one per BYTES_PER_TOKEN of it.
BYTES_PER_TOKEN = 4


# Causes of crashed requests already logged with their traceback (see log_crash).
_CRASHES: set[tuple[str, str]] = set()
MAX_CRASH_CAUSES = 256


def log_crash(exc: BaseException, what: str) -> None:
    """Log an exception that ended a request, with its traceback, once per cause: its
    type and the line that raised it. A strategy that raises on every request would
    otherwise write a traceback per request; the repeats go to the debug log."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    cause = (type(exc).__qualname__, where)
    if cause in _CRASHES or len(_CRASHES) >= MAX_CRASH_CAUSES:
        log.debug("%s: %s: %s (logged before)", what, type(exc).__qualname__, exc)
        return
    _CRASHES.add(cause)
    log.error(
        "%s: %s: %s (raised at %s; logged once per cause)",
        what,
        type(exc).__qualname__,
        exc,
        where,
        exc_info=exc,
    )


class Outcome(enum.Enum):
    DONE = "done"  # the response completed
    STALE = "stale"  # a reused connection was closed before any byte: retry anywhere
    DROPPED = "dropped"  # connection lost before any byte: retry elsewhere
    BROKEN = "broken"  # garbage before the head: 502
    TIMEOUT = "timeout"  # no head within the request timeout: 504
    CUT = "cut"  # failed after the head reached the client
    CLIENT_GONE = "client_gone"
    PARTNER = "partner"  # the other half of a disaggregated request failed (pd.py)
    FALLBACK = "fallback"  # 429 or 503 before any byte, and the model has fallbacks
    RETRIED = "retried"  # 5xx or 429 before any byte, dropped: another service is tried
    CRASHED = "crashed"  # ended by Journey.crash: accounted there, never finished


class Retry(enum.Enum):
    NO = "no"  # answer the error
    ELSEWHERE = "elsewhere"  # on another service, within --retries
    ANYWHERE = "anywhere"  # on any service, this one too: not its fault


class Failure(NamedTuple):
    """What a failed exchange means: the error the client gets if nothing else is
    tried, where a retry may go, and whether it counts against the service."""

    fault: Fault
    retry: Retry
    blames_service: bool
    message: str  # formatted with service, reason and timeout


# Outcomes absent here end without an answer from the journey: CLIENT_GONE (no one
# to answer) and CUT (the client already has all it gets: an error event, or a cut
# body and a close; it counts against the service).
FAILURES: dict[Outcome, Failure] = {
    # Its keep-alive timer beat ours: the connection was stale, the service is fine.
    Outcome.STALE: Failure(Fault.BACKEND_UNREACHABLE, Retry.ANYWHERE, False, "{reason}"),
    Outcome.DROPPED: Failure(
        Fault.BACKEND_CLOSED,
        Retry.ELSEWHERE,
        True,
        "service {service} closed the connection before answering",
    ),
    Outcome.BROKEN: Failure(Fault.BACKEND_BROKEN, Retry.NO, True, "service {service}: {reason}"),
    # A load signal, answered before any byte: the journey's next model is tried.
    Outcome.FALLBACK: Failure(
        Fault.NO_HEALTHY_SERVICE, Retry.NO, False, "service {service} {reason}"
    ),
    # Its answer was dropped (the breaker counted it) for another service's.
    Outcome.RETRIED: Failure(
        Fault.BACKEND_BROKEN, Retry.ELSEWHERE, False, "service {service} {reason}"
    ),
    # Not the service's fault: a new pair is tried (pd.py).
    Outcome.PARTNER: Failure(Fault.BACKEND_UNREACHABLE, Retry.ANYWHERE, False, "{reason}"),
    Outcome.TIMEOUT: Failure(
        Fault.BACKEND_TIMEOUT,
        Retry.NO,
        True,
        "service {service} sent no response within {timeout:g}s (--request-timeout)",
    ),
}


class Exchange:
    """Relays one response from an upstream connection to the client connection."""

    __slots__ = (
        "_chunked",
        "_frame",
        "_framing",
        "_out",
        "_sse",
        "_tail",
        "_tail_prev",
        "bytes_out",
        "client",
        "conn",
        "head_sent",
        "journey",
        "loop",
        "outcome",
        "reason",
        "reusable",
        "sent_at",
        "sent_tick",
        "service",
        "status",
        "strategy",
        "timeout_s",
        "ttfb_s",
    )

    def __init__(
        self,
        journey: Journey,
        conn: UpstreamConnection,
        service: Service,
        timeout_s: float,
    ) -> None:
        self.journey = journey
        self.client = journey.client
        self.strategy = journey.strategy
        self.conn = conn
        self.service = service
        self.loop = conn.loop
        self.timeout_s = timeout_s
        self.outcome: Outcome | None = None
        self.status = 0
        self.reason = ""
        self.head_sent = False
        self.reusable = False
        self.ttfb_s = 0.0
        # uvloop's loop.time() ticks in milliseconds: too coarse for latencies,
        # fine for timeouts.
        self.sent_at = time.perf_counter()
        self.sent_tick = self.loop.time()
        self._out: list[bytes] = []
        self._chunked = False  # the client gets a chunked body
        self._frame = False  # ... which is framed here (the backend's was close-delimited)
        self._framing = NO_BODY
        self._sse = False
        # The last two body pieces: where the backend's usage object is, for metrics.
        self._tail = b""
        self._tail_prev = b""
        self.bytes_out = 0

    # --- Sink: called by the upstream connection --------------------------------

    def on_head(self, status: int, head: bytes, framing: int) -> None:
        if status >= 429 and self._drops(status):  # a 200 pays this one comparison
            return
        self.status = status
        self._framing = framing
        self.ttfb_s = time.perf_counter() - self.sent_at
        route = self.journey.route
        assert route is not None  # an exchange exists only for a routed request
        self.strategy.on_first_byte(self.service, route, self.ttfb_s)
        client = self.client
        request = client.current
        assert request is not None
        keep_alive = request.keep_alive and not client.closing
        # A chunked body passes as the backend framed it (the Transfer-Encoding
        # header with it); a close-delimited one is framed here, once per read.
        if framing in (LENGTH, NO_BODY):
            self._chunked = False
        elif request.http_minor >= 1:
            self._chunked = True
            self._frame = framing == UNTIL_CLOSE
        else:
            keep_alive = False  # an HTTP/1.0 client learns the end from the close
        request.keep_alive = keep_alive
        # The head as the backend sent it, less the headers of its own connection;
        # the status line says HTTP/1.1 whatever the backend spoke.
        eol = head.find(b"\r\n")
        line = head[:eol] if head.startswith(b"HTTP/1.1 ") else b"HTTP/1.1" + head[8:eol]
        fields = head[eol:-4]  # each header preceded by its CRLF
        hop = _HOP_BY_HOP_BUT_TE if self._chunked and not self._frame else _HOP_BY_HOP_FIELDS
        connection = self.conn.connection
        if connection is not None:
            fields = drop_named(fields, connection)
        fields = hop.sub(b"", fields)
        self._sse = _SSE_TYPE.search(fields) is not None
        out = [line, fields, b"\r\n"]
        if self._frame:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        if self.journey.head_extra:
            out.append(self.journey.head_extra)
        out.append(b"\r\n")
        self._out.append(b"".join(out))
        self.head_sent = True

    def _drops(self, status: int) -> bool:
        """Whether this error answer is dropped, unrelayed, because something else may
        answer instead (nothing has reached the client yet): another service of the
        model (--retry-on-5xx, within --retries), else the model's next fallback. The
        connection goes with it: its body is never read."""
        journey = self.journey
        if (
            status in RETRIED_STATUSES
            and journey.router.config.retry_on_5xx
            and journey.may_retry(self.service)
        ):
            outcome = Outcome.RETRIED
        elif journey.fallbacks and (status == 429 or status == 503):
            outcome = Outcome.FALLBACK
        else:
            return False
        self.status = status
        self.reason = f"answered {status}"
        self.conn.close()
        self._settle(outcome)
        return True

    def on_body(self, data: bytes) -> None:
        self._tail_prev = self._tail
        self._tail = data
        if self._frame:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.bytes_out += len(data)
            self.client.write(data)
            out.clear()

    def on_complete(self, reusable: bool) -> None:
        if self._frame:
            self._out.append(b"0\r\n\r\n")
        self.flush()
        self.reusable = reusable
        if self.outcome is None:
            # The upstream connection is done with this exchange (it calls this last):
            # account at once, without a turn of the loop.
            self.outcome = Outcome.DONE
            self.journey.finish(self)

    def on_error(self, exc: Exception) -> None:
        """A callback of this exchange (or the connection's own code) raised while the
        backend's bytes were parsed: not the backend's fault, and the end of the request."""
        self.journey.crash(exc, self)

    def on_lost(self, reason: str, broken: bool) -> None:
        self.reason = reason
        if self.head_sent:
            self._cut(reason)
        elif broken:
            self._settle(Outcome.BROKEN)
        elif self.conn.reused and not self.conn.received_any:
            self._settle(Outcome.STALE)
        else:
            self._settle(Outcome.DROPPED)

    # --- events from the client side and the clock ---------------------------------

    def client_gone(self) -> None:
        """The client hung up: stop the backend's work at once, never pool the socket."""
        self.conn.close()
        self._settle(Outcome.CLIENT_GONE)

    def partner_failed(self, reason: str) -> None:
        """The prefill of this decode failed before the decode answered (pd.py)."""
        self.reason = reason
        self.conn.close()
        self._settle(Outcome.PARTNER)

    def stop(self, reason: str) -> bool:
        """The journey crashed (``Journey.crash``): close the backend's connection and
        return the service's slot here, since no finish follows; a stream whose head
        the client has ends as a cut one does. Whether the client has the head (an
        exchange already settled is left to its pending finish)."""
        if self.outcome is None:
            self.outcome = Outcome.CRASHED
            self.conn.close()
            self.service.release()
            if self.head_sent:
                self._end_stream(reason)
        elif self.head_sent:
            self.client.close()  # complete, or already cut: nothing may follow it
        return self.head_sent

    def pause(self) -> None:
        self.conn.pause_reading()

    def resume(self) -> None:
        self.conn.resume_reading()

    @property
    def tail(self) -> bytes:
        """The response's last bytes (at most TAIL_BYTES): where ``usage`` is."""
        last = self._tail
        if len(last) >= TAIL_BYTES:
            return last[-TAIL_BYTES:]
        return self._tail_prev[-(TAIL_BYTES - len(last)) :] + last

    def check_timeout(self, now: float) -> None:
        """Called by the router's sweep: give up on a silent backend."""
        if self.outcome is not None:
            return
        if not self.head_sent:
            if now - self.sent_tick >= self.timeout_s:
                self.reason = f"no response from the backend within {self.timeout_s:g}s"
                self.conn.close()
                self._settle(Outcome.TIMEOUT)
            return
        # Waiting on a slow client is not the backend's silence (and resuming restarts
        # the count: UpstreamConnection.resume_reading).
        if not self.client.flow.write_paused and self.conn.silent_for(now) >= self.timeout_s:
            self.conn.close()
            self._cut(f"the backend sent nothing for {self.timeout_s:g}s")

    # --- internals ------------------------------------------------------------

    def _cut(self, reason: str) -> None:
        """End a response the backend broke off after its head reached the client."""
        self.reason = reason
        self._end_stream(reason)
        self._settle(Outcome.CUT)

    def _end_stream(self, reason: str) -> None:
        """The error event, where the stream can carry one; then the close."""
        # A chunk of our own can follow only a complete chunk of the backend's.
        if (
            self._sse
            and self._framing != LENGTH
            and (self._frame or not self._chunked or self.conn.at_chunk_boundary())
        ):
            message = f"the backend failed mid-stream: {reason}"
            event = sse_error_event(message)
            if self._chunked:
                self._out += (b"%x\r\n" % len(event), event, b"\r\n0\r\n\r\n")
            else:
                self._out.append(event)
        self.flush()
        # The body is incomplete or was patched: this connection carries nothing more.
        self.client.close()

    def _settle(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            # Not inline: this may run inside the backend parser's callbacks.
            self.loop.call_soon(self.journey.finish, self)


class MeteredExchange(Exchange):
    """The exchange of a request whose key has a ``tpm``: it also counts what it relays,
    so that an answer that ends without its usage (the client hung up before the usage
    chunk, the backend broke off, or never sends usage) is still charged. Only such
    requests pay for the count: two C-speed scans of each read, never a parse."""

    __slots__ = ("body_bytes", "events")

    def __init__(
        self,
        journey: Journey,
        conn: UpstreamConnection,
        service: Service,
        timeout_s: float,
    ) -> None:
        super().__init__(journey, conn, service, timeout_s)
        self.body_bytes = 0
        self.events = 0  # SSE events relayed: each starts a line with "data:"

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        # A raw newline is never inside an event's JSON, so "\ndata:" starts an event
        # (after the blank line before it, or a chunk-size line); a read may begin with one.
        self.events += data.count(b"\ndata:") + data.startswith(b"data:")
        Exchange.on_body(self, data)

    def estimate(self, body: bytes) -> tuple[int, int]:
        """(prompt, completion) tokens this answer to ``body`` cost, as far as can be
        told without its usage."""
        completion = self.events if self._sse else self.body_bytes // BYTES_PER_TOKEN
        return prompt_estimate(body)[0], completion


def prompt_estimate(body: bytes) -> tuple[int, int]:
    """The tokens of a request whose backend had its prompt and relayed nothing: at
    least one."""
    return max(1, len(body) // BYTES_PER_TOKEN), 0


def _route(router: ProxyHost, request: ClientRequest) -> RouteRequest:
    """Decode what routing needs; raise the 400/404/503 a request deserves."""
    path = request.path
    body = request.body
    if path not in MODEL_PATHS:
        return _route_other(router, request)
    head = decode_head(path, body)
    model = head.model
    if model is None:
        config = router.config
        model = config.default_model
        if model is None:
            served = router.registry.served_models()
            if len(served) == 1:
                model = served[0]
            elif config.require_model:
                raise ProxyError(
                    Fault.BAD_REQUEST,
                    "'model' is required (--require-model); served models: "
                    + (name_models(served) or "none yet"),
                )
        if model is not None:
            body = with_model(body, model)
        # Else any healthy service takes it, with the body as sent (the InfiniLM
        # routers' way): the backend answers with the model it serves.
    return RouteRequest(path, model, head, body, request.headers)


def _route_other(router: ProxyHost, request: ClientRequest) -> RouteRequest:
    """Any other path: another /v1/ one (rerank, audio...) or one the router forwards
    whole (SGLang's /generate, vLLM's /tokenize...). Its model is the JSON body's, or a
    form's ``model`` field; without one, --default-model's services take it (the body
    as sent: such APIs do not all take a ``model``), else any healthy service."""
    path = request.path
    body = request.body
    head: RequestHead | None = None
    model: str | None = None
    if body:
        if request.is_json or body.lstrip()[:1] == b"{":
            # The OpenAI API's fields are checked on its own paths only.
            head = decode_head(path, body) if path.startswith(b"/v1/") else forwarded_head(body)
            if head is not None:
                model = head.model
        else:
            content_type = request.header(b"content-type")
            if is_form(content_type):
                assert content_type is not None
                model = form_model(body, content_type)
    if model is None:
        model = router.config.default_model
    return RouteRequest(path, model, head, body, request.headers)


def _any_model(router: ProxyHost, route: RouteRequest) -> None:
    """--any-model, before routing: a name no service lists is the one model served, as
    the Rust routers take it (so a disaggregated model is split as its own name would
    be); with several served, a request without a model (see _candidates)."""
    registry = router.registry
    if route.model in registry.known_models or not registry.services:
        return
    if registry.discovery_pending():
        return  # it may yet be listed: _candidates decides
    served = list(registry.known_models)
    route.model = served[0] if len(served) == 1 else None


def _candidates(router: ProxyHost, route: RouteRequest) -> list[Service]:
    registry = router.registry
    model = route.model
    if model is None:
        found = registry.whole()
        if not found:
            raise ProxyError(Fault.NO_HEALTHY_SERVICE, registry.why_unavailable(None))
        return found
    found = registry.candidates(model)
    if found:
        return found
    if model in registry.known_models or not registry.services:
        raise ProxyError(Fault.NO_HEALTHY_SERVICE, registry.why_unavailable(model))
    if router.config.any_model:
        # A name no service lists (--any-model): it goes on as a request without a
        # model, to every healthy service, its body as sent. Its name is not kept: a
        # client's invented names must not become metric labels or strategy state.
        route.model = None
        return _candidates(router, route)
    if registry.discovery_pending():
        pending = [s for s in registry.services.values() if not s.models_known]
        if any(s.last_check is None for s in pending):
            raise ProxyError(
                Fault.NO_HEALTHY_SERVICE,
                f"model {model!r} is not known yet: model discovery is still pending on "
                f"{name_models((s.name for s in pending), 'GET /services', LOGGED_SERVICES)}; "
                "retry shortly",
            )
        # Every service that might serve it has failed its check: say why, not "pending".
        raise ProxyError(Fault.NO_HEALTHY_SERVICE, registry.why_unavailable(model, pending))
    models = name_models(registry.known_models) or "none"
    raise ProxyError(
        Fault.MODEL_NOT_FOUND, f"model {model!r} not found; available models: {models}"
    )


def _request_data(
    service: Service, request: ClientRequest, body: bytes, extra: bytes = b""
) -> list[bytes]:
    lines = [
        b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s"
        % (request.method, service.path_prefix, request.target, service.host_header, extra)
    ]
    drop = REQUEST_DROP
    if request.connection is not None:
        named = connection_names(request.connection)
        if named:
            drop = drop | named
    for name, value in request.headers:
        if name not in drop:
            lines.append(b"%s: %s\r\n" % (name, value))
    if body or request.method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    head = b"".join(lines)
    if len(body) > LARGE_BODY:
        return [head, body]
    return [head + body]


class Journey:
    """One proxied request, from routing to its last byte, retries included."""

    __slots__ = (
        "client",
        "failures",
        "fallbacks",
        "fallen_from",
        "forward_extra",
        "grant",
        "head_extra",
        "id_header",
        "last_candidates",
        "last_error",
        "priority",
        "queued_at",
        "request",
        "request_id",
        "route",
        "router",
        "span",
        "strategy",
        "trace_id",
        "tried",
    )

    def __init__(self, router: ProxyHost, client: ClientConnection, request: ClientRequest) -> None:
        self.router = router
        self.client = client
        self.request = request
        self.route: RouteRequest | None = None
        self.strategy = router.strategy
        self.tried: list[Service] = []
        given = request.request_id
        self.request_id = given or router.next_request_id()
        # A made id travels as a header to the backend and back to the client.
        self.id_header = b"" if given else b"X-Request-ID: %s\r\n" % self.request_id
        self.head_extra = self.id_header  # what the client's response head gets added
        tracer = router.tracer
        if tracer is None and request.traceparent is None:
            trace_line, self.trace_id = tracing.new_trace()
            self.span: Any = None  # an OpenTelemetry span, with --otlp-endpoint
        else:
            trace_line, self.trace_id, self.span = tracing.begin(tracer, request.traceparent)
        # What the backend's request head gets added: the id, the trace, the Via.
        self.forward_extra = self.id_header + trace_line + router.via_line
        # Models to try next (the route's model's fallbacks), and the first model asked
        # when one of them answers.
        self.fallbacks: list[str] = _NONE
        self.fallen_from: str | None = None
        self.failures = 0
        self.last_error: ProxyError | None = None
        self.queued_at = 0.0
        self.last_candidates: list[Service] = []
        self.grant: Grant | None = None  # a [[keys]] key's hold on its limits, until the end
        self.priority = 0  # in the admission queue: its key's, or its X-Priority

    @classmethod
    def take_over(cls, journey: Journey, *args: Any) -> Journey:
        """A journey of this kind for ``journey``'s request, with its identity: the
        request id, the trace and its span, the fallbacks left."""
        new = cls.__new__(cls)
        for name in (
            "router", "client", "request", "route", "strategy", "tried", "request_id",
            "id_header", "head_extra", "trace_id", "span", "forward_extra", "fallbacks",
            "fallen_from", "grant", "priority",
        ):  # fmt: skip
            setattr(new, name, getattr(journey, name))
        new.tried = []
        new.failures = 0
        new.last_error = None
        new.queued_at = 0.0
        new.last_candidates = []
        new.setup(*args)
        return new

    def setup(self, *args: Any) -> None:
        """What a kind of journey adds to the state ``take_over`` copied."""

    def start(self) -> None:
        try:
            try:
                self.route = _route(self.router, self.request)
            except ProxyError as exc:
                self.fail(exc)
                return
            if self.router.policies and not self._policies(self.route):
                return  # answered, or waiting for the key limits' verdict
            self._proceed()
        except Exception as exc:
            self.crash(exc)

    def _proceed(self) -> None:
        """The routed request goes on: to its model's strategy, or disaggregated."""
        route = self.route
        assert route is not None
        if self.router.config.any_model and route.model is not None:
            _any_model(self.router, route)
        self.strategy = self.router.strategy_for(route.model)
        pd_models = self.router.registry.pd_models
        if pd_models and route.model in pd_models:
            self.router.disaggregate(self)
            return
        self.attempt()

    # --- policies: keys, aliases, fallbacks --------------------------------------------

    def _policies(self, route: RouteRequest) -> bool:
        """The request's key (its models, priority and limits), then aliases and
        fallbacks. False: answered, or waiting for the limits' verdict."""
        key = self.request.key
        if key is not None:
            if not self._key_allows(key, route):
                return False
            if key.limited:
                verdict = self.router.limits.check(key)
                if isinstance(verdict, asyncio.Future):
                    verdict.add_done_callback(self._limits_answered)
                    return False
                if not self._granted(key, verdict):
                    return False
            else:
                self.grant = UNLIMITED
                self.router.metrics.key_request(key.name)
        if self.router.model_policies:
            self._model_policies(route)
        return True

    def _key_allows(self, key: Key, route: RouteRequest) -> bool:
        """The key may ask for this model (as asked: an alias is a model of its own),
        with this priority. Streams of a key with tpm ask for their usage."""
        metrics = self.router.metrics
        model = route.model
        if key.models and model not in key.models:
            metrics.key_rejected(key.name, "model")
            allowed = ", ".join(sorted(key.models))
            self.fail(
                ProxyError(
                    Fault.FORBIDDEN,
                    f"API key {key.name!r} may not use model {model!r}; it may use: {allowed}"
                    if model is not None
                    else f"API key {key.name!r} may use only some models ({allowed}); "
                    "name one in 'model'",
                )
            )
            return False
        self.priority = key.priority
        if key.max_priority is not None:
            given = find_header(self.request.headers, b"x-priority")
            if given is not None:
                try:
                    if len(given) > 12:  # int() of a long one costs; none needs it
                        raise ValueError
                    priority = int(given)
                except ValueError:
                    self.fail(ProxyError(Fault.BAD_REQUEST, _BAD_PRIORITY))
                    return False
                if priority > key.max_priority:
                    metrics.key_rejected(key.name, "priority")
                    self.fail(
                        ProxyError(
                            Fault.FORBIDDEN,
                            f"X-Priority {priority} is above API key {key.name!r}'s "
                            f"max_priority, {key.max_priority}; send at most that",
                        )
                    )
                    return False
                self.priority = priority
        head = route.head
        if key.tpm and head is not None and head.stream and route.path in USAGE_PATHS:
            # Without usage a stream's tokens go uncounted, and tpm could be dodged.
            route.body = with_stream_usage(route.body)
        return True

    def _granted(self, key: Key, verdict: Verdict) -> bool:
        if isinstance(verdict, Refusal):
            self.router.metrics.key_rejected(key.name, verdict.limit)
            error = ProxyError(Fault.RATE_LIMITED, verdict.message)
            error.retry_after = verdict.retry_after
            self.fail(error)
            return False
        self.grant = verdict
        self.router.metrics.key_request(key.name)
        return True

    def _limits_answered(self, answer: asyncio.Future[Verdict]) -> None:
        """The verdict of another process (the supervisor, Redis) came."""
        try:
            verdict = answer.result()
            if self.client.closing:  # hung up meanwhile
                if not isinstance(verdict, Refusal):
                    verdict.end(0)
                return
            key = self.request.key
            route = self.route
            assert key is not None and route is not None
            if self._granted(key, verdict):
                if self.router.model_policies:
                    self._model_policies(route)
                self._proceed()
        except Exception as exc:
            self.crash(exc)

    def _end_key(self, tokens: tuple[int, int] | None) -> None:
        """The request is over: its key's grant ends, with the (prompt, completion)
        tokens it used, if its answer said."""
        grant, self.grant = self.grant, None
        assert grant is not None
        grant.end(tokens[0] + tokens[1] if tokens else 0)
        key = self.request.key
        if tokens and key is not None:
            self.router.metrics.key_tokens(key.name, tokens)

    def _model_policies(self, route: RouteRequest) -> None:
        """An alias becomes its served model (the one rewrite of the body's ``model``);
        a model with fallbacks gets its chain, and the response names who answered."""
        model = route.model
        if model is None:
            return
        config = self.router.config
        target = config.aliases.get(model)
        if target is not None:
            route.model = model = target
            route.body = naming_model(route, target)
            self._name_model(model)
        chain = fallback_chain(config.models, model)
        if chain:
            self.fallbacks = chain
            self._name_model(model)

    def _name_model(self, model: str) -> None:
        self.head_extra = self.id_header + b"X-LMProxy-Model: %s\r\n" % header_value(model)

    def _fall_back(self, error: ProxyError) -> None:
        """The model could not answer before any byte reached the client: its next
        fallback gets the request, with a fresh set of retries."""
        route = self.route
        assert route is not None and route.model is not None
        previous = route.model
        model = self.fallbacks.pop(0)
        router = self.router
        router.metrics.fallback(previous, model)
        log.debug(
            "request %s: %s; falling back from model %s to %s",
            self.request_id.decode(),
            error.message,
            previous,
            model,
        )
        if self.fallen_from is None:
            self.fallen_from = previous
        route.model = model
        route.body = naming_model(route, model)
        self._name_model(model)
        self.tried = []
        self.failures = 0
        self.last_error = None
        self.strategy = router.strategy_for(model)
        pd_models = router.registry.pd_models
        if pd_models and model in pd_models:
            router.disaggregate(self)
            return
        self.attempt()

    def attempt(self) -> None:
        """Choose a service and send; or queue, when every candidate is at its limit."""
        router = self.router
        route = self.route
        assert route is not None
        try:
            candidates = _candidates(router, route)
        except ProxyError as exc:
            # After a failed try, the failure explains it better than a 503.
            self.fail(self.last_error or exc)
            return
        if self.tried:
            candidates = [s for s in candidates if s not in self.tried]
            if not candidates:
                assert self.last_error is not None
                self.fail(self.last_error)
                return
        if router.registry.any_static:  # infini-router's size-based routing
            candidates = by_cache_type(
                candidates, route, router.config.cache_type_routing_threshold
            )
        admission = router.admission
        if admission.limited:
            self.last_candidates = candidates
            admitted = admission.admit(self, candidates)
            if admitted is None:  # queued, or refused
                return
            candidates = admitted
        service = self.strategy.choose(candidates, route)
        # Counted from the choice, not the send: a request still connecting holds its
        # slot, or concurrent requests would all see room (and an idle service).
        service.acquire()
        pool = service.pool
        assert pool is not None
        conn = pool.take_idle()
        if conn is not None:
            self._send(service, conn)
        else:
            self.client.task = router.loop.create_task(self._connect(service))

    def abandon(self) -> None:
        """The client hung up while this request waited for a slot."""
        self.router.admission.leave(self.client)
        if self.grant is not None:
            self._end_key(None)

    def may_start(self) -> bool:
        """Whether a waiting request would now find room (or an error to report)."""
        assert self.route is not None
        try:
            candidates = _candidates(self.router, self.route)
        except ProxyError:
            return True
        return any(has_room(s) for s in candidates if s not in self.tried)

    async def _connect(self, service: Service) -> None:
        pool = service.pool
        assert pool is not None
        try:
            conn = await pool.connect()
        except ConnectError as exc:
            self.client.task = None
            service.release()
            self.router.registry.request_failed(service, str(exc))
            self.router.metrics.failed(service, "connect")
            self._retry(
                service,
                ProxyError(
                    Fault.BACKEND_UNREACHABLE, f"service {service.name} is unreachable: {exc}"
                ),
            )
            return
        except asyncio.CancelledError:  # the client hung up while we connected
            service.release()
            if self.grant is not None:
                self._end_key(None)
            raise
        except Exception as exc:  # a bug: the slot comes back here, the rest in crash
            self.client.task = None
            service.release()
            self.crash(exc)
            return
        self.client.task = None
        if self.client.closing:
            service.release()
            pool.release(conn)
            return
        try:
            self._send(service, conn)
        except Exception as exc:
            self.crash(exc)

    def _send(self, service: Service, conn: UpstreamConnection) -> None:
        route = self.route
        assert route is not None
        request = self.request
        router = self.router
        kind = Exchange
        if self.grant is not None and request.key is not None and request.key.tpm:
            kind = MeteredExchange  # only a key with a tpm pays for counting what it gets
        exchange = kind(self, conn, service, router.config.request_timeout)
        self.client.exchange = exchange
        self.strategy.on_start(service, route)
        data = _request_data(service, request, route.body, self.forward_extra)
        router.metrics.added.observe(time.perf_counter() - request.received_at)
        conn.send(exchange, data, request.method == b"HEAD", request.http_minor == 0)
        if self.client.flow.write_paused:
            exchange.pause()

    def finish(self, exchange: Exchange) -> None:
        """The exchange has an outcome: account for it, then answer, retry or stop."""
        try:
            self._finish(exchange)
        except Exception as exc:
            # A bug, or a strategy's on_end: it costs this one request, not its slots.
            self.crash(exc, exchange)

    def crash(self, exc: Exception, exchange: Exchanging | None = None) -> None:
        """The supervised end: code run for this request raised (a strategy plugin, a
        sink, a bug). The request ends here, whatever it was doing: every slot it holds
        comes back (the service's, the key's grant, its place in the queue), the client
        gets a 502 (or, when it has the response head, the stream's error event) and the
        connection closes, so nothing the journey left scheduled can answer after it.
        ``exchange``: the one that was being finished, if any (it knows whether the
        client has its head)."""
        log_crash(exc, f"request {self.request_id.decode()} failed inside the router")
        client = self.client
        try:
            reason = f"the router failed: {type(exc).__name__}"
            # Still the client's current request? A late step of one already answered
            # (SGLang's prefill after its decode) must not touch the next request's state.
            mine = client.current is self.request
            answered = False  # the client has this request's response head
            current = client.exchange if mine else None
            if mine:
                client.exchange = None
            for held in (exchange, current) if current is not exchange else (exchange,):
                if held is not None and held.stop(reason):
                    answered = True
            if mine:
                task = client.task
                if task is not None and not task.done() and task is not asyncio.current_task():
                    task.cancel()  # a connect under way: it returns its slot as it stops
                client.task = None
                if client.waiting is self:
                    self.router.admission.leave(client)
            self._release_held()
            if not mine or (isinstance(exchange, Exchange) and exchange.outcome is Outcome.DONE):
                # Answered and logged; what failed came after that.
                if self.grant is not None:
                    self._end_key(None)
                if self.span is not None:
                    self._end_span("", Fault.ROUTING_FAILED.status)
                if mine:
                    client.close()
                return
            self._log("", Fault.ROUTING_FAILED.status, 0, 0.0)  # ends the key's grant
            if answered or client.closing:
                client.close()
            else:
                self.request.keep_alive = False
                client.respond_error(
                    Fault.ROUTING_FAILED,
                    f"the router failed routing this request ({type(exc).__name__}); retry, "
                    "and if it persists see the router's log (a strategy plugin or a bug)",
                    self.id_header,
                )
        except Exception:  # crash must end the request even when its own steps fail
            log.exception("request %s: ending it after a failure failed", self.request_id.decode())
            client.abort()

    def _release_held(self) -> None:
        """What a kind of journey holds besides its exchange and its connect (pd.py)."""

    def _finish(self, exchange: Exchange) -> None:
        self.client.exchange = None
        exchange.service.release()
        self._account(exchange)
        outcome = exchange.outcome
        if outcome is Outcome.DONE:
            self.client.response_done()
            return
        failure = FAILURES.get(outcome) if outcome is not None else None
        if failure is None:
            return  # the client is gone, or already has its error event (CUT)
        error = ProxyError(
            failure.fault,
            failure.message.format(
                service=exchange.service.name,
                reason=exchange.reason,
                timeout=exchange.timeout_s,
            ),
        )
        if failure.retry is Retry.NO:
            self.fail(error)
        else:
            self._retry(exchange.service if failure.retry is Retry.ELSEWHERE else None, error)

    def _account(self, exchange: Exchange) -> None:
        """Figures, health, strategy feedback and the connection's fate, whatever
        comes next for the request."""
        service = exchange.service
        latency_s = time.perf_counter() - exchange.sent_at
        route = self.route
        assert route is not None
        registry = self.router.registry
        outcome = exchange.outcome
        if outcome is Outcome.DONE:
            status = exchange.status
            tokens = self.router.metrics.finished(
                service, route.model, status, latency_s, exchange.ttfb_s, exchange.tail
            )
            if self.grant is not None:
                # An answer without usage (or OpenAI's "usage": null alone) is estimated.
                if (
                    (tokens is None or tokens == (0, 0))
                    and status < 400
                    and isinstance(exchange, MeteredExchange)
                ):
                    tokens = exchange.estimate(route.body)
                self._end_key(tokens)
            if self.span is not None:
                self._end_span(service.name, status, exchange)
            if self.router.config.access_log != "off":  # no call at all when it is off
                self._log(service.name, status, exchange.bytes_out, exchange.ttfb_s)
            service.request_count += 1
            service.latencies.append(latency_s)
            if status == 508:
                # A router (this one, or one in a ring with it) saw its own Via.
                registry.request_failed(
                    service, f"routing loop: {service.url} leads back to a router it came through"
                )
            elif status >= 500 or status == 429:
                registry.answered_error(service, status)  # a 5xx is its breaker's step
            elif service.watched:
                registry.request_succeeded(service)  # only then is there a streak to end
            self.strategy.on_end(service, route, latency_s, status < 500)
            if exchange.reusable:
                service.pool.release(exchange.conn)  # type: ignore[union-attr]
            else:
                exchange.conn.close()
            return
        if outcome is Outcome.CLIENT_GONE:
            if self.grant is not None:
                self._end_key(self._cut_short(exchange, route))
            self._log(service.name, 499, exchange.bytes_out, exchange.ttfb_s)
            service.request_count += 1
            self.strategy.on_end(service, route, latency_s, True)
            return
        assert outcome is not None
        if outcome is Outcome.FALLBACK or outcome is Outcome.RETRIED:
            # It answered 429 or 5xx, dropped for another try: counted as any such answer.
            service.request_count += 1
            registry.answered_error(service, exchange.status)
        if outcome is Outcome.PARTNER:  # its prefill failed: nothing against this service
            service.request_count += 1
            self.strategy.on_end(service, route, latency_s, True)
            return
        self.router.metrics.failed(service, outcome.value)
        self.strategy.on_end(service, route, latency_s, False)
        failure = FAILURES.get(outcome)
        if failure is None or failure.blames_service:
            service.request_count += 1
            registry.request_failed(service, exchange.reason)
        if outcome is Outcome.CUT:
            if self.grant is not None:
                self._end_key(self._cut_short(exchange, route))
            self._log(service.name, exchange.status, exchange.bytes_out, exchange.ttfb_s)

    def _cut_short(self, exchange: Exchange, route: RouteRequest) -> tuple[int, int] | None:
        """The tokens an answer cut short (the client hung up, the backend broke off)
        used: its usage if it came whole; else, for a tpm key, the estimate of what the
        backend was sent and what was relayed, wherever the cut came."""
        tokens = whole_usage_tokens(exchange.tail)
        if tokens is None and exchange.status < 400 and isinstance(exchange, MeteredExchange):
            tokens = exchange.estimate(route.body)  # an error answer costs nothing
        return tokens

    def may_retry(self, failed: Service) -> bool:
        """Whether a retry could follow ``failed``'s error answer: retries are left, and
        another service may take the request (else that answer is relayed)."""
        if self.failures >= self.router.config.retries or self.client.closing:
            return False
        route = self.route
        assert route is not None
        try:
            candidates = _candidates(self.router, route)
        except ProxyError:
            return False
        tried = self.tried
        return any(s is not failed and s not in tried for s in candidates)

    def _retry(self, failed: Service | None, error: ProxyError) -> None:
        """Try another service (any service, if ``failed`` is None), within --retries."""
        self.failures += 1
        if failed is not None:
            self.tried.append(failed)
            self.last_error = error
        if self.failures > self.router.config.retries or self.client.closing:
            self.fail(error)
        else:
            self.attempt()

    def shed(self, error: ProxyError) -> None:
        key = self.request.key
        self.router.metrics.shed(key.name if key is not None else None)
        self.fail(error)

    def fail(self, error: ProxyError) -> None:
        if self.fallbacks and error.fault in FALLBACK_FAULTS and not self.client.closing:
            self._fall_back(error)
            return
        self._log("", error.status, 0, 0.0)
        if not self.client.closing:
            extra = self.id_header
            if error.retry_after is not None:
                extra += b"Retry-After: %d\r\n" % error.retry_after
            self.client.respond_error(error.fault, error.message, extra)

    def _end_span(self, service: str, status: int, exchange: Exchange | None = None) -> None:
        """The request's OTLP span (--otlp-endpoint): its attributes, then its end."""
        span, self.span = self.span, None
        assert span is not None
        route = self.route
        span.set_attribute("lmproxy.model", route.model if route and route.model else "")
        span.set_attribute("lmproxy.service", service)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("lmproxy.retries", self.failures)
        if self.fallen_from is not None:
            span.set_attribute("lmproxy.fallback_from", self.fallen_from)
        if exchange is not None:
            tokens = usage_tokens(exchange.tail)
            if tokens is not None:
                span.set_attribute("gen_ai.usage.input_tokens", tokens[0])
                span.set_attribute("gen_ai.usage.output_tokens", tokens[1])
            if exchange.head_sent:
                # When the backend's head came, on the wall clock.
                since = time.perf_counter() - (exchange.sent_at + exchange.ttfb_s)
                span.add_event("first_byte", timestamp=time.time_ns() - int(since * 1e9))
        span.end()

    def _log(self, service: str, status: int, bytes_out: int, ttfb_s: float) -> None:
        """The request's end, whatever it was: its span, its key's grant, the log line."""
        if self.grant is not None:
            self._end_key(None)
        if self.span is not None:
            self._end_span(service, status)
        style = self.router.config.access_log
        if style != "off":
            request = self.request
            log_access(
                style,
                self.request_id,
                request.method,
                request.path,
                self.route.model if self.route else None,
                service,
                status,
                bytes_out,
                ttfb_s,
                time.perf_counter() - request.received_at,
                self.fallen_from,
                self.trace_id,
                request.key.name if request.key is not None else None,
            )
